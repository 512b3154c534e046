"""The chain convention shared by ScheduleBlocks (compile side) and the runtime: which tasks each step runs, and
what each waits for.

A *chain* runs one program ``k`` times, each step's carried inputs being
outputs of the step before (a chunked prefill: chunk *i+1* reads the KV
chunk *i* wrote). Only the last step's outputs are the chain's result, so a
step before the last runs only the tasks the next step needs: those that
compute a carried output, and their dependencies. For a chunked prefill
that skips the LM head (and the final norm) of every chunk but the last.

Step *i*'s task *T* depends on *T*'s ``after`` tasks in step *i* and, for each
carried input of *T*, on the task of step *i-1* that produced it
(:func:`chain_dependencies`): ScheduleBlocks builds its DAG from that rule,
the runtime waits by it, and loading an artifact checks its orders against
it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def carried_tasks(tasks: Sequence[Mapping], outputs: Sequence[Mapping], carry: Iterable[int]) -> list[str]:
    """Names (in program order) of the tasks that compute the outputs ``carry`` (indices into ``outputs``) and
    everything they depend on: what a step before the last runs. ``tasks`` are program entries' tasks
    (``name``, ``outputs``, ``after``), ``outputs`` the program's outputs (``{"value": name}``)."""
    producer = {o: t["name"] for t in tasks for o in t["outputs"]}
    after = {t["name"]: t["after"] for t in tasks}
    stack = [producer[outputs[i]["value"]] for i in carry if outputs[i].get("value") in producer]
    needed: set[str] = set()
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(after[name])
    return [t["name"] for t in tasks if t["name"] in needed]


def step_tasks(tasks: Sequence[Mapping], outputs: Sequence[Mapping], carry: Iterable[int], step: int,
               steps: int) -> list[str]:
    """The tasks step ``step`` of a ``steps``-step chain runs: all of them in the last step, else the carried ones."""
    if step == steps - 1:
        return [t["name"] for t in tasks]
    return carried_tasks(tasks, outputs, carry)


def chain_dependencies(tasks: Sequence[Mapping], outputs: Sequence[Mapping], carry: Iterable[Sequence],
                       steps: int) -> dict[tuple[int, str], list[tuple[int, str]]]:
    """The dependencies of a ``steps``-step chain: ``(step, task) -> [(step, task), ...]``.

    The keys are the tasks each step runs (:func:`step_tasks`), step by
    step, each step's in program order. Step ``i``'s task ``T`` waits for
    ``(i, a)`` for each ``a`` in ``T``'s ``after``, then (``i > 0``), for
    each of ``T``'s inputs, in order, that ``carry`` names, for
    ``(i - 1, p)``, ``p`` being the task that computes the output feeding
    that input. ``tasks`` are program entries' tasks (``name``, ``inputs``,
    ``outputs``, ``after``), ``outputs`` the program's outputs,
    ``carry`` its ``(output index, input name)`` pairs. The carry must be
    valid (every carried output a task's output): each caller checks that
    first and raises its own error.
    """
    carry = [(index, name) for index, name in carry]
    producer = {o: t["name"] for t in tasks for o in t["outputs"]}
    carried_from = {name: producer[outputs[index]["value"]] for index, name in carry}
    carried = set(carried_tasks(tasks, outputs, [index for index, _ in carry]))
    deps: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for i in range(steps):
        for t in tasks:
            if i < steps - 1 and t["name"] not in carried:
                continue
            deps[(i, t["name"])] = [(i, a) for a in t["after"]] + (
                [(i - 1, carried_from[x]) for x in t["inputs"] if x in carried_from] if i else [])
    return deps
