"""The executor: a small scheduler that runs a program's task DAG on its queues.

Compiling and loading meet here: ``kiln.compile`` builds an
:class:`~kiln.runtime.artifact.Artifact` in memory and ``kiln.load`` reads one
from disk; both are run by :class:`CompiledModel`, so what a test checks after
compiling is what runs after loading.

A :class:`Program` runs its tasks in a topological order of their ``after``
dependencies (the listed order where it is one). With tasks on one queue it
runs them one after another in the calling thread; with several, one worker
per queue (the caller's thread for the first) runs that queue's tasks in that
order and waits on an event per task for inputs from other queues. Every task
reads only values computed before it in the one order, so the results are
bitwise those of running it sequentially. A :class:`Trace` records each task's
queue, start and end as Chrome trace-event JSON (Perfetto, ``chrome://tracing``).

Controls are program inputs the caller does not pass: small integers or enum
values (``start_pos``, a bit-width) set between calls with
``set_controls``, or by a ``policy`` called before every call; a value not
allowed raises :class:`ControlError` naming the control and its allowed values.
Each call reads one consistent set of values when it starts: the model's
(``set_controls``, under a lock), then those of ``with model.using(...)``
(local to the thread or asyncio task, so concurrent callers can run with
different values), then ``run(..., controls=...)``, then the policy's.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import ArtifactError, InputMismatchError
from ..ir.signature import Signature
from .artifact import Artifact, write_artifact
from .manifest import control_allows, describe_allowed, topological_order
from .kernels import load_kernel
from .threads import intra_op_threads


class _ArtifactFiles:
    """Files of an artifact, by name: the bytes ``read_artifact`` verified, never the path they came from.

    A loader that needs a path (TVM's ``dlopen``) gets a copy of the verified
    bytes in a private directory this process creates (``mkdtemp``: mode 0700,
    a fresh name), so replacing a file in the artifact directory after it was
    hashed cannot put foreign code in its place. The copy lives as long as
    this object (the CompiledModel).
    """

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self._tmp: tempfile.TemporaryDirectory | None = None

    def bytes(self, name: str) -> bytes:
        try:
            return self.artifact.files[name]
        except KeyError:
            raise ArtifactError(f"artifact has no file {name!r}") from None

    def path(self, name: str) -> str:
        data = self.bytes(name)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kiln-")
        p = Path(self._tmp.name) / name
        if not p.exists():
            p.write_bytes(data)
        return str(p)


class ControlError(InputMismatchError):
    """A control set to a value it does not allow, or a control the program does not have."""


class Control:
    """A run-time control of a program: its allowed values and the value the next call uses."""

    def __init__(self, entry: dict):
        self.entry = entry
        self.name: str = entry["name"]
        self.default = entry["default"]
        self.value = entry["default"]
        self.dtype = torch.int32 if entry["dtype"] == "i32" else torch.int64

    @property
    def allowed(self) -> tuple | range:
        """The allowed values: a tuple (an enum), or a range of integers."""
        if "values" in self.entry:
            return tuple(self.entry["values"])
        return range(self.entry["min"], self.entry["max"] + 1)

    def check(self, value) -> None:
        if not control_allows(self.entry, value):
            raise ControlError(f"control {self.name!r} cannot be {value!r}; it allows {describe_allowed(self.entry)}")

    def tensor(self, value) -> torch.Tensor:
        """``value`` as the 0-d tensor the program reads (an enum value: its index)."""
        index = self.entry["values"].index(value) if "values" in self.entry else value
        return torch.tensor(index, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"<kiln control {self.name}={self.value!r} ({describe_allowed(self.entry)})>"


class Trace:
    """Task timings of the calls made while it records, as Chrome trace-event JSON.

    ``events`` holds ``(program, task, queue, start_ns, end_ns)``; ``to_json``
    gives complete (``ph: "X"``) events in microseconds, one thread per queue.
    """

    def __init__(self):
        self.events: list[tuple[str, str, str, int, int]] = []
        self._lock = threading.Lock()
        self.origin_ns = time.perf_counter_ns()

    def add(self, program: str, task: str, queue: str, start_ns: int, end_ns: int) -> None:
        with self._lock:
            self.events.append((program, task, queue, start_ns, end_ns))

    def to_json(self) -> dict:
        queues = list(dict.fromkeys(q for _, _, q, _, _ in self.events))
        tid = {q: i for i, q in enumerate(queues)}
        pid = os.getpid()
        meta = [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid[q], "args": {"name": q}} for q in queues]
        events = [{"name": task, "cat": program, "ph": "X", "ts": (start - self.origin_ns) / 1e3,
                   "dur": (end - start) / 1e3, "pid": pid, "tid": tid[queue],
                   "args": {"program": program, "queue": queue}}
                  for program, task, queue, start, end in self.events]
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


PLAN_CONTROL = "plan"  # the selector of a nested-quantized model's bit-width plans (kiln/passes/quantize_nested.py)

# Control values of ``using`` blocks, local to a thread / asyncio task: {id(program or model): {name: value}}.
_USING: contextvars.ContextVar[dict[int, dict] | None] = contextvars.ContextVar("kiln_controls_using", default=None)


def _using() -> dict[int, dict]:
    return _USING.get() or {}


class Program:
    """One program of an artifact: its signature, controls and task DAG, with kernels loaded."""

    def __init__(self, name: str, entry: dict, artifact: Artifact, files: _ArtifactFiles, owner: CompiledModel):
        self.name = name
        self.entry = entry
        self.signature = Signature.from_json(entry["signature"])
        self.controls: dict[str, Control] = {c["name"]: Control(c) for c in entry.get("controls", ())}
        self._owner = owner
        self._weights = artifact.weights
        tasks = entry["tasks"]
        order = topological_order(tasks, f"program {name!r}")  # read_artifact has checked every name
        self._tasks = []
        for i in order:
            t = tasks[i]
            kernel = load_kernel(t, files, {w: artifact.weights[w] for w in t["weights"]})
            self._tasks.append((t["name"], t["queue"], t["inputs"], t["outputs"], kernel, t["after"]))
        self.queues = list(dict.fromkeys(t[1] for t in self._tasks)) or [entry.get("queue", "cpu0")]
        self._outputs = entry["outputs"]
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._controls_lock = threading.Lock()

    def _checked(self, values: Mapping) -> dict:
        for name, value in values.items():
            if name not in self.controls:
                raise ControlError(f"program {self.name!r} has no control {name!r}"
                                   + (f"; its controls are {', '.join(self.controls)}" if self.controls else
                                      "; it has none"))
            self.controls[name].check(value)
        return dict(values)

    def set_controls(self, **values) -> None:
        """Set controls for the next calls; each value is checked first (none is set if one is refused)."""
        values = self._checked(values)
        with self._controls_lock:
            for name, value in values.items():
                self.controls[name].value = value

    @contextlib.contextmanager
    def using(self, **values) -> Iterator[None]:
        """Run the calls of this thread (or asyncio task) inside the block with these control values."""
        values = self._checked(values)
        outer = _using()
        token = _USING.set({**outer, id(self): {**outer.get(id(self), {}), **values}})
        try:
            yield
        finally:
            _USING.reset(token)

    def control_values(self, controls: Mapping | None = None) -> dict:
        """The control values a call made now would run with (before the policy's): see the module docstring."""
        with self._controls_lock:
            values = {n: c.value for n, c in self.controls.items()}
        values.update(_using().get(id(self), {}))
        if controls:
            values.update(self._checked(controls))
        return values

    def run(self, flat_inputs: list[torch.Tensor], trace: Trace | None = None, controls: Mapping | None = None,
            *, ask_policy: bool = True) -> list:
        """Run on flat, already checked inputs; returns flat outputs.

        ``controls``: values for this call only, over those of ``set_controls`` and ``using``.
        A policy's choice applies to this call and is kept for the next ones (``set_controls``).
        """
        values = self.control_values(controls)
        policy = self._owner.policy if ask_policy else None
        if policy is not None and self.controls:
            chosen = policy(self.name, dict(values))
            if chosen:
                self.set_controls(**chosen)
                values.update(chosen)
        trace = trace if trace is not None else self._owner._trace
        env = dict(zip((i.name for i in self.signature.inputs), flat_inputs))
        env.update((n, self.controls[n].tensor(v)) for n, v in values.items())
        with intra_op_threads(self.entry.get("intra_op_threads")):  # CompileOptions.intra_op_threads
            if len(self.queues) == 1:
                self._run_queue(self._tasks, env, trace, None)
            else:
                self._run_queues(env, trace)
        weights = self._weights
        return [(env[o["value"]] if o["value"] in env else weights[o["value"]]) if "value" in o else o["literal"]
                for o in self._outputs]

    def _run_queue(self, tasks, env: dict, trace: Trace | None, events: dict | None) -> None:
        with torch.no_grad():  # thread-local: every worker sets it
            for name, queue, inputs, outputs, kernel, after in tasks:
                if events is not None:
                    for dep in after:
                        events[dep].wait()
                    if events[None].is_set():
                        return
                start = time.perf_counter_ns() if trace is not None else 0
                env.update(zip(outputs, kernel(*[env[n] for n in inputs])))
                if trace is not None:
                    trace.add(self.name, name, queue, start, time.perf_counter_ns())
                if events is not None:
                    events[name].set()

    def _run_queues(self, env: dict, trace: Trace | None) -> None:
        events = {t[0]: threading.Event() for t in self._tasks}
        events[None] = threading.Event()
        per_queue = {q: [t for t in self._tasks if t[1] == q] for q in self.queues}

        def work(tasks):
            try:
                self._run_queue(tasks, env, trace, events)
            except BaseException:
                events[None].set()
                for e in events.values():  # wake every waiter: they see the failure and stop
                    e.set()
                raise

        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.queues) - 1, thread_name_prefix=f"kiln-{self.name}")
        first, *others = self.queues
        futures = [self._pool.submit(work, per_queue[q]) for q in others]
        errors = []
        try:
            work(per_queue[first])
        except BaseException as e:
            errors.append(e)
        join_workers(futures, errors)

    def __call__(self, *args, **kwargs):
        return self.signature.unflatten(self.run(self.signature.flatten(args, kwargs)))

    def __repr__(self) -> str:
        return (f"<kiln program {self.name} tasks={len(self._tasks)} queues={self.queues} "
                f"controls={list(self.controls)}>")


def join_workers(futures, errors: list | None = None) -> None:
    """Wait for every queue worker, then raise the first failure (``errors``: ones already caught), if any."""
    errors = list(errors or [])
    for f in futures:
        try:
            f.result()
        except BaseException as e:
            errors.append(e)
    if errors:
        raise errors[0]


Policy = Callable[[str, Mapping[str, object]], "Mapping[str, object] | None"]


class CompiledModel:
    """A compiled model: call it like the original module (its default program); ``programs`` holds them all.

    ``policy``: called as ``policy(program_name, current_controls)`` before
    every call of a program with controls; the values it returns are set
    (checked) for that call and the ones after.

    An artifact with a *selector* (``manifest["selector"]``: a control whose
    values are program names, e.g. ``plan`` over the bit-width plans of a
    nested-quantized model) runs the program the selector names: it is one of
    :attr:`controls`, set like the others, and a policy sees it and may
    switch it before each call. The programs it selects between take the same
    inputs and controls; setting one of those sets it for all of them.
    """

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self._files = _ArtifactFiles(artifact)
        self.policy: Policy | None = None
        self.threads = None  # an AdaptiveThreads (kiln.runtime.threads): fewer threads when a core is taken
        self._trace: Trace | None = None
        m = artifact.manifest
        self.programs: dict[str, Program] = {name: Program(name, entry, artifact, self._files, self)
                                             for name, entry in m["programs"].items()}
        self.default_program = self.programs[m["default_program"]]
        self.signature = self.default_program.signature
        selector = m.get("selector")
        self.selector: Control | None = None if selector is None else Control(
            {"name": selector["name"], "dtype": "i64", "default": selector["default"], "values": selector["values"]})
        self._selected = [self.programs[v] for v in selector["values"]] if selector else [self.default_program]
        self._selector_lock = threading.Lock()

    @property
    def target(self) -> str:
        return self.artifact.manifest["target"]

    @property
    def manifest(self) -> dict:
        return self.artifact.manifest

    @property
    def example_inputs(self) -> list[torch.Tensor] | None:
        return self.artifact.example_inputs

    @property
    def controls(self) -> dict[str, Control]:
        """The controls of a call, by name (each with ``allowed`` and ``value``): the selector's, then the program's."""
        if self.selector is None:
            return self.default_program.controls
        return {self.selector.name: self.selector, **self._program().controls}

    def _split(self, values: Mapping) -> tuple[object, dict]:
        """(the selector's value or None, the other controls) of ``values``, the selector's checked."""
        rest = dict(values)
        chosen = None
        if self.selector is not None and self.selector.name in rest:
            chosen = rest.pop(self.selector.name)
            self.selector.check(chosen)
        return chosen, rest

    def _program(self, value=None) -> Program:
        if self.selector is None:
            return self.default_program
        if value is None:
            with self._selector_lock:
                value = self.selector.value
        return self.programs[value]

    def set_controls(self, **values) -> None:
        """Set controls for the next calls (``ControlError`` if a value is not allowed; then none is set)."""
        chosen, rest = self._split(values)
        for program in self._selected:
            program._checked(rest)
        for program in self._selected:
            program.set_controls(**rest)
        if chosen is not None:
            with self._selector_lock:
                self.selector.value = chosen

    @contextlib.contextmanager
    def using(self, **values) -> Iterator[None]:
        """``with model.using(bits=4): model(x)``: control values for this thread's (asyncio task's) calls
        inside the block only; other threads keep theirs."""
        chosen, rest = self._split(values)
        with contextlib.ExitStack() as stack:
            for program in self._selected:
                stack.enter_context(program.using(**rest))
            if chosen is not None:
                outer = _using()
                token = _USING.set({**outer, id(self): {self.selector.name: chosen}})
                stack.callback(_USING.reset, token)
            yield

    def selected(self, controls: Mapping | None = None) -> str:
        """The program a call made now would run (before the policy's choice)."""
        chosen, _ = self._split(controls or {})
        return self._selection(chosen).name

    def _selection(self, chosen) -> Program:
        """The program of the selector value ``chosen`` (None: the using() block's, else the model's)."""
        if chosen is None and self.selector is not None:
            chosen = _using().get(id(self), {}).get(self.selector.name)
        return self._program(chosen)

    def run(self, flat_inputs: list[torch.Tensor], trace: Trace | None = None, controls: Mapping | None = None
            ) -> list:
        """Run the selected (default) program on flat, already checked inputs; returns flat outputs (``Program.run``)."""
        if self.threads is not None:  # kiln.runtime.threads.AdaptiveThreads: this call's intra-op threads
            with self.threads.call():
                return self._run(flat_inputs, trace, controls)
        return self._run(flat_inputs, trace, controls)

    def _run(self, flat_inputs: list[torch.Tensor], trace: Trace | None, controls: Mapping | None) -> list:
        if self.selector is None:
            return self.default_program.run(flat_inputs, trace, controls)
        chosen, rest = self._split(controls or {})
        program = self._selection(chosen)
        if self.policy is not None:
            current = {self.selector.name: program.name, **program.control_values(rest)}
            choice = self.policy(program.name, current)
            if choice:
                self.set_controls(**choice)  # checked; kept for the next calls
                chosen, more = self._split(choice)
                program = self.programs[chosen] if chosen is not None else program
                rest.update(more)
        return program.run(flat_inputs, trace, rest, ask_policy=False)

    @contextlib.contextmanager
    def tracing(self, trace: Trace | None = None) -> Iterator[Trace]:
        """Record every task of the calls made inside the block: ``with model.tracing() as t: ...; t.save(f)``."""
        trace = trace or Trace()
        previous, self._trace = self._trace, trace
        try:
            yield trace
        finally:
            self._trace = previous

    def __call__(self, *args, **kwargs):
        return self.signature.unflatten(self.run(self.signature.flatten(args, kwargs)))

    def save(self, path, signing_key=None) -> Path:
        """Write the artifact to the directory ``path`` (atomically), signed if given an ed25519 ``signing_key``.

        ``signing_key``: an ``Ed25519PrivateKey``, or its raw or PEM bytes
        (``kiln.runtime.signing``); ``kiln.load(path, trusted_keys=[...])`` then
        checks the signature before it loads anything.
        """
        return write_artifact(self.artifact, path, signing_key)

    def __repr__(self) -> str:
        m = self.artifact.manifest
        return (f"<kiln.CompiledModel {m.get('model')} target={m['target']} programs={list(self.programs)} "
                f"tasks={sum(len(p.entry['tasks']) for p in self.programs.values())} "
                f"weights={len(self.artifact.weights)}>")
