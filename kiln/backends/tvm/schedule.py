"""The schedule stage's mechanism: a target's rules applied to every TIR kernel, each result named.

A target gives its rules, in order (the CPU's: ``kiln/backends/cpu/schedule.py``);
``schedule_pass`` wraps them in dlight's ``ApplyDefaultSchedule`` and the
first rule that returns a schedule wins. :class:`NamedRule` marks the kernel
it scheduled with the rule's name, which ``applied_rule`` reads back (the
report lists it per kernel), and turns a rule that a schedule primitive
refuses into "does not apply", so the next rule can try.
"""
from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import get_root_block

RULE_ATTR = "kiln.schedule_rule"

# The schedule name the report gives a kernel whose schedule came from a tuning database.
META_SCHEDULE = "meta_schedule"

log = logging.getLogger("kiln")


class NamedRule(dlight.ScheduleRule):
    """Wraps a rule so the scheduled function records which rule produced it."""

    def __init__(self, name: str, rule):
        self.name = name
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            space = self.rule.apply(func, target, tunable)
        except (s_tir.ScheduleError, ValueError, tvm.error.InternalError) as e:
            # The rule's preconditions missed a case a primitive refuses (ScheduleError, or
            # ValueError from a stale loop handle). Each rule starts from a fresh schedule of
            # the unchanged function, so the next rule can safely try.
            log.debug("kiln: schedule rule %s gave up on %s: %s", self.name,
                      func.attrs.get("global_symbol", "?") if func.attrs else "?", str(e).splitlines()[0])
            return None
        if space is None:
            return None
        sch = space[0] if isinstance(space, list) else space
        sch.annotate(get_root_block(sch), RULE_ATTR, self.name)
        return sch


def applied_rule(func: tirx.PrimFunc) -> str | None:
    """The rule that scheduled ``func`` (None: no rule matched, it runs as legalized); a kernel generated
    already scheduled (a target's own converter) names its schedule in the ``kiln.schedule`` attribute."""
    if func.attrs is not None and "kiln.schedule" in func.attrs:
        return str(func.attrs["kiln.schedule"])
    body = func.body
    block = getattr(body, "block", None)
    return str(block.annotations[RULE_ATTR]) if block is not None and RULE_ATTR in block.annotations else None


def schedule_pass(rules: list):
    """dlight's ``ApplyDefaultSchedule`` with ``rules`` (already-scheduled kernels, ``tirx.is_scheduled``, are skipped)."""
    return dlight.ApplyDefaultSchedule(*rules)
