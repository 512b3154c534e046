"""The chain convention shared by ScheduleBlocks (compile side) and the runtime: which tasks each step runs.

A *chain* runs one program ``k`` times, each step's carried inputs being
outputs of the step before (a chunked prefill: chunk *i+1* reads the KV
chunk *i* wrote). Only the last step's outputs are the chain's result, so a
step before the last runs only the tasks the next step needs: those that
compute a carried output, and their dependencies. For a chunked prefill
that skips the LM head (and the final norm) of every chunk but the last.
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
