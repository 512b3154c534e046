"""Chained runs of one program: ``k`` steps, each step's carried inputs being outputs of the step before.

The chain's result is the last step's outputs (and, in them, the carried
state); a step before the last runs only the tasks the next step reads
(:func:`kiln.ir.chain.carried_tasks`).

A program entry with a ``chain`` field (written by
:func:`kiln.passes.schedule_blocks.schedule_chain`) declares its carry
(``[[output index, input name], ...]``: the output that feeds that input of
the next step) and, per chain length, one task order per queue. A
:class:`Chain` runs ``k`` steps either

- ``"in-order"``: every task after the one before it, step by step, in the
  program's task order (each still on its own queue's worker, so both runs
  use the same threads and cores), or
- ``"scheduled"``: the stored out-of-order orders, one worker per queue,
  each task waiting only for its own dependencies (its ``after`` within its
  step, and for a carried input the task of the step before that produced
  it: :func:`kiln.ir.chain.chain_dependencies`).

Every task reads only values its dependencies wrote, each step in its own
environment, so both orders give bitwise the same results (as long as each
kernel is deterministic for a fixed thread count: ``queue_cores`` fixes the
cores and thread count of every queue's worker).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import ArtifactError, InputMismatchError
from ..ir.chain import chain_dependencies
from .executor import Program, Trace, join_workers

_pinned = threading.local()  # the cores this worker thread was last pinned to

IN_ORDER = "in-order"
SCHEDULED = "scheduled"


class Chain:
    """Runs :class:`Program` ``program`` as a chain of steps (see the module docstring)."""

    def __init__(self, program: Program, queue_cores: Mapping[str, Sequence[int]] | None = None,
                 carry: Mapping[int, str] | None = None):
        """``carry`` (output index -> input name) is needed only for a program without a ``chain`` field,
        which then runs in order only (to time its tasks before ScheduleBlocks orders them, say)."""
        chain = program.entry.get("chain")
        if chain is None and carry is None:
            raise ArtifactError(f"program {program.name!r} has no field chain (compile it with a chain schedule)")
        self.program = program
        pairs = chain["carry"] if chain is not None else sorted(carry.items())
        self.carry: dict[str, int] = {name: index for index, name in pairs}
        self.orders: dict[int, dict[str, list[tuple[int, str]]]] = {} if chain is None else {
            int(k): {q: [(int(i), n) for i, n in order] for q, order in per_queue.items()}
            for k, per_queue in chain["orders"].items()}
        self._by_name = {t[0]: t for t in program._tasks}
        producer = {o: t[0] for t in program._tasks for o in t[3]}
        outputs = program.entry["outputs"]
        for name, index in self.carry.items():
            if not 0 <= index < len(outputs) or outputs[index].get("value") not in producer:
                raise InputMismatchError(f"carry: output {index} of program {program.name!r} is not a value a task "
                                         "computes")
            if name not in {i.name for i in program.signature.inputs}:
                raise InputMismatchError(f"carry: {name!r} is not an input of program {program.name!r}")
        self._deps: dict[int, dict[tuple[int, str], list[tuple[int, str]]]] = {}  # per chain length
        self.queue_cores = self._check_cores(queue_cores or {})
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    @property
    def max_steps(self) -> int:
        """The longest chain with an out-of-order schedule (0: none; it runs in order only)."""
        return max(self.orders, default=0)

    def _check_cores(self, queue_cores: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        available = os.sched_getaffinity(0)
        out = {}
        for q, cores in queue_cores.items():
            if q not in self.program.queues:
                raise InputMismatchError(f"queue_cores names queue {q!r}; program {self.program.name!r} has "
                                         f"{', '.join(self.program.queues)}")
            cores = tuple(cores)
            if not cores or not set(cores) <= available:
                raise InputMismatchError(f"queue_cores[{q!r}] = {list(cores)}: cores must be a non-empty subset "
                                         f"of this process's {sorted(available)}")
            out[q] = cores
        return out

    def run(self, steps: Sequence[Sequence[torch.Tensor | None]], controls: Sequence[Mapping] | None = None,
            order: str = SCHEDULED, trace: Trace | None = None) -> list:
        """Run ``len(steps)`` steps; returns the last step's flat outputs.

        ``steps[i]`` are step ``i``'s flat inputs; a carried input is taken
        from the step before (pass None for it) except in step 0, which
        needs them all. ``controls[i]``: step ``i``'s control values.
        """
        k = len(steps)
        program = self.program
        if order not in (IN_ORDER, SCHEDULED):
            raise InputMismatchError(f"order must be {IN_ORDER!r} or {SCHEDULED!r}, not {order!r}")
        if order == SCHEDULED and k not in self.orders:
            raise InputMismatchError(f"program {program.name!r} has out-of-order schedules for chains of "
                                     f"1..{self.max_steps} steps, not {k}")
        controls = list(controls) if controls is not None else [{}] * k
        if len(controls) != k:
            raise InputMismatchError(f"{k} steps but {len(controls)} sets of controls")
        names = [i.name for i in program.signature.inputs]
        envs = []
        for i, (flat, values) in enumerate(zip(steps, controls)):
            if len(flat) != len(names):
                raise InputMismatchError(f"step {i} has {len(flat)} inputs; the program takes {len(names)}")
            env = {n: v for n, v in zip(names, flat) if not (i and n in self.carry)}
            missing = [n for n in names if n not in env and not (i and n in self.carry)]
            if missing or any(v is None for v in env.values()):
                raise InputMismatchError(f"step {i} lacks inputs {missing or [n for n, v in env.items() if v is None]}")
            env.update((n, program.controls[n].tensor(v)) for n, v in program.control_values(values).items())
            envs.append(env)
        orders, deps = self._orders(k, order)
        self._run(orders, deps, envs, trace or program._owner._trace)
        env, weights = envs[-1], program._weights
        return [(env[o["value"]] if o["value"] in env else weights[o["value"]]) if "value" in o else o["literal"]
                for o in program._outputs]

    def _dependencies(self, k: int) -> dict[tuple[int, str], list[tuple[int, str]]]:
        """The dependencies of a ``k``-step chain, computed once per ``k`` (a prefill runs the same ``k`` again and
        again); the caller must not change them."""
        deps = self._deps.get(k)
        if deps is None:
            entry = self.program.entry
            by_name = {t["name"]: t for t in entry["tasks"]}
            tasks = [by_name[t[0]] for t in self.program._tasks]  # the order a step runs them in order
            carry = [(index, name) for name, index in self.carry.items()]
            deps = self._deps[k] = chain_dependencies(tasks, entry["outputs"], carry, k)
        return deps

    def _orders(self, k: int, order: str) -> tuple[dict[str, list[tuple[int, str]]], dict]:
        """The per-queue orders of a ``k``-step chain and what each of its tasks waits for."""
        deps = self._dependencies(k)
        if order == SCHEDULED:
            return self.orders[k], deps
        sequence = list(deps)  # step by step, each step in program order
        per_queue: dict[str, list[tuple[int, str]]] = {}
        for n in sequence:
            per_queue.setdefault(self._by_name[n[1]][1], []).append(n)
        before = dict(zip(sequence[1:], sequence))  # in order, each also waits for the one before
        return per_queue, {n: deps[n] + [before[n]] if n in before else deps[n] for n in sequence}

    def _run(self, orders, deps, envs, trace: Trace | None) -> None:
        events = {n: threading.Event() for n in deps}
        failed = threading.Event()
        program = self.program

        def work(queue: str, order: list[tuple[int, str]]) -> None:
            cores = self.queue_cores.get(queue)
            if cores is not None and getattr(_pinned, "cores", None) != cores:
                os.sched_setaffinity(0, cores)  # this thread only
                torch.set_num_threads(len(cores))  # this thread's OpenMP team (slow: once per thread)
                _pinned.cores = cores
            try:
                with torch.no_grad():
                    for n in order:
                        for d in deps[n]:
                            events[d].wait()
                        if failed.is_set():
                            return
                        i, name = n
                        _, _, inputs, outputs, kernel, _ = self._by_name[name]
                        env = envs[i]
                        for x in inputs:
                            if x not in env and i and x in self.carry:
                                src = program._outputs[self.carry[x]]["value"]
                                env[x] = envs[i - 1][src]
                        start = time.perf_counter_ns() if trace is not None else 0
                        env.update(zip(outputs, kernel(*[env[x] for x in inputs])))
                        if trace is not None:
                            trace.add(program.name, f"{name}@{i}", queue, start, time.perf_counter_ns())
                        events[n].set()
            except BaseException:
                failed.set()
                for e in events.values():
                    e.set()
                raise

        # One thread per queue, always the same (pinned once, its caches warm). A run submits to every queue
        # under the lock, so concurrent runs reach every queue in the same order: no queue waits on a run
        # that another queue holds behind the one it is running (a deadlock).
        with self._lock:
            for q in orders:
                if q not in self._pools:
                    self._pools[q] = ThreadPoolExecutor(1, thread_name_prefix=f"kiln-chain-{program.name}-{q}")
            futures = [self._pools[q].submit(work, q, o) for q, o in orders.items()]
        join_workers(futures)


def measure_tasks(chain: Chain, steps: Sequence[Sequence[torch.Tensor | None]], controls: Sequence[Mapping],
                  repeat: int = 3) -> dict[str, float]:
    """Each task's median time in microseconds over ``repeat`` in-order runs of the chain (after one warm-up).

    The costs ScheduleBlocks orders a chain by when they are measured: on
    this machine, with the chain's ``queue_cores``, every task run alone.
    """
    chain.run(steps, controls, order=IN_ORDER)
    times: dict[str, list[float]] = {}
    for _ in range(repeat):
        trace = Trace()
        chain.run(steps, controls, order=IN_ORDER, trace=trace)
        for _, task, _, start, end in trace.events:
            times.setdefault(task.rsplit("@", 1)[0], []).append((end - start) / 1e3)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
