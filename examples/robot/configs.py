"""Configurations of the benchmark: how the trained fp32 policy is turned into what the closed loop runs.

A configuration is a factory ``(model, ctx) -> RobotPolicy`` registered under
its name (``fp32``, ``static8``, ...); it is built once per task, with a
:class:`BuildContext` holding the results of the configurations already run
on that task (``dyq`` runs before ``static-matched``, which reads DyQ's
measured average bits from there). The harness (:mod:`sim`) does, at every
env step::

    signals.update(obs)                   # KinematicSignals: speed, jerk, gripper events, ...
    plan = policy.select(signals)         # the bit-width plan for this step (static: always the same)
    tokens = greedy_decode(policy.step_fn(plan), text_ids, obs)
    signals.commanded(action)

and records ``plan.name`` / ``plan.avg_bits`` per step, so the printed
``avg_bits`` is the mean over all steps of all episodes and the fraction of
steps at each plan is reported beside it. ``weight_bytes`` is what the
configuration holds for every plan it may select.

The quantized configurations are kiln's (``kiln.NestedQuantization``): the
trained policy is compiled once with the plans ``w8`` / ``w4`` / ``w2`` and
DyQ's ``dyq-hi`` / ``dyq-mid`` / ``dyq-lo`` (``DYQ_PLANS``: budgets that kiln
allocates per layer from the sensitivity it measures on calibration samples
of the demonstrations), the plan a run-time control of the one artifact.

- ``static8`` / ``static4`` / ``static2``: one plan for every step;
- ``dyq``: :class:`SwitchingPolicy` whose selector is
  ``kiln.runtime.precision.DyQPolicy`` reading :class:`~kinematics.KinematicSignals`;
- ``static-matched``: the static plan kiln allocates at the average bits DyQ
  ran the same task at (``dyq`` runs first).

``weight_bytes`` counts each quantized linear in nested form with the views
the configuration's plans read (``kiln.ir.nested.held_bytes``), everything
else (embeddings, observation projectors, norms: 8% of the parameters) fp32.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .kinematics import KinematicSignals
from .model import VLAPolicy, example_inputs

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
FP32_BITS = 32


@dataclass(frozen=True)
class Plan:
    """A bit-width plan: a name for the per-step statistics and its mean bits per quantizable weight."""
    name: str
    avg_bits: float


class RobotPolicy:
    """One configuration of the policy, as the harness runs it (subclass or use the ones below)."""

    name: str = "?"
    weight_bytes: int = 0

    def reset(self) -> None:
        """A new episode starts (clear hysteresis state and the like)."""

    def select(self, signals: KinematicSignals) -> Plan:
        raise NotImplementedError

    def step_fn(self, plan: Plan) -> StepFn:
        """The forward ``(text_ids, obs, action_ids) -> logits`` run under ``plan``."""
        raise NotImplementedError


class StaticPolicy(RobotPolicy):
    """One plan for every step."""

    def __init__(self, name: str, step: StepFn, plan: Plan, weight_bytes: int):
        self.name, self._step, self.plan, self.weight_bytes = name, step, plan, weight_bytes

    def select(self, signals: KinematicSignals) -> Plan:
        return self.plan

    def step_fn(self, plan: Plan) -> StepFn:
        return self._step


class SwitchingPolicy(RobotPolicy):
    """Several plans over the same weights; ``selector(signals) -> plan name`` chooses one per env step.

    ``steps[name]`` runs plan ``name``; ``weight_bytes`` is what is held for all of them (for nested weights:
    the one stored form, not the sum of the views). ``selector`` may keep state (hysteresis); it gets a
    ``reset()`` call at each episode start when it has one."""

    def __init__(self, name: str, steps: dict[str, StepFn], plans: dict[str, Plan],
                 selector: Callable[[KinematicSignals], str], weight_bytes: int):
        self.name, self.steps, self.plans, self.selector = name, steps, plans, selector
        self.weight_bytes = weight_bytes

    def reset(self) -> None:
        if hasattr(self.selector, "reset"):
            self.selector.reset()

    def select(self, signals: KinematicSignals) -> Plan:
        return self.plans[self.selector(signals)]

    def step_fn(self, plan: Plan) -> StepFn:
        return self.steps[plan.name]


class NotAvailable(Exception):
    """A configuration whose implementation has not landed yet."""


# ---------------------------------------------------------------- accounting

def fp32_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---------------------------------------------------------------- the registry

@dataclass
class BuildContext:
    """What a configuration may read when it is built for a task: the task, the results
    (:class:`sim.EvalResult`, by configuration name) of the configurations already run on it, the
    calibration samples for kiln's sensitivity profile (input tuples of the forward) and kiln's target."""
    task: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    calibration: list[tuple] = field(default_factory=list)
    target: str = "cpu"


CONFIGS: dict[str, Callable[[VLAPolicy, BuildContext], RobotPolicy]] = {}
ALL_CONFIGS = ("fp32", "static8", "static4", "static2", "static-matched", "dyq")


def run_order(names) -> list[str]:
    """``names`` in the order they must run: ``dyq`` before ``static-matched`` (which needs DyQ's bits)."""
    names = list(names)
    if "dyq" in names and "static-matched" in names and names.index("dyq") > names.index("static-matched"):
        names.remove("dyq")
        names.insert(names.index("static-matched"), "dyq")
    return names


def register(name: str):
    def deco(fn):
        CONFIGS[name] = fn
        return fn
    return deco


def build(name: str, model: VLAPolicy, ctx: BuildContext | None = None) -> RobotPolicy:
    if name not in CONFIGS:
        raise KeyError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name](model, ctx or BuildContext())


@register("fp32")
def _fp32(model: VLAPolicy, ctx: BuildContext) -> RobotPolicy:
    return StaticPolicy("fp32", model.eval(), Plan("fp32", FP32_BITS), fp32_bytes(model))


# ---------------------------------------------------------------- kiln: nested weights, plans, the DyQ policy

# The plans of one kiln artifact: the static ones, and DyQ's (most to least precise). A float is an
# average-bit budget that kiln allocates over the layers by their measured sensitivity.
STATIC_PLANS = {"w8": {"default": 8}, "w4": {"default": 4}, "w2": {"default": 2}}
DYQ_PLANS = {"dyq-hi": 4.5, "dyq-mid": 3.0, "dyq-lo": {"default": 2}}
_ARTIFACTS: dict[tuple, Any] = {}


def kiln_artifact(model: VLAPolicy, plans: dict, ctx: BuildContext):
    """``model`` compiled by kiln with these nested-quantization plans (the plan a run-time control); cached."""
    import json

    import kiln

    key = (id(model), json.dumps(plans, sort_keys=True), ctx.target)
    if key not in _ARTIFACTS:
        options = kiln.CompileOptions(quantization=kiln.NestedQuantization(plans=plans),
                                      calibration=ctx.calibration or None)
        _ARTIFACTS[key] = kiln.compile(model, example_inputs(model.cfg), target=ctx.target, options=options)
    return _ARTIFACTS[key]


def kiln_step(cm, plan: str) -> StepFn:
    """The forward of artifact ``cm`` under ``plan`` (set for this call only)."""
    return lambda text_ids, obs, action_ids: cm.run([text_ids, obs, action_ids], controls={"plan": plan})[0]


def kiln_plan(cm, plan: str) -> Plan:
    return Plan(plan, cm.manifest["quantization"]["plans"][plan]["avg_bits"])


def kiln_weight_bytes(model: VLAPolicy, cm, plans) -> int:
    """Bytes a configuration selecting among ``plans`` holds: each quantized linear in nested form with the views
    those plans read (``kiln.ir.nested.held_bytes``), every other tensor in fp32."""
    from kiln.ir.nested import held_bytes

    report = cm.manifest["quantization"]
    total = fp32_bytes(model)
    for layer in report["layers"].values():
        views = tuple({report["plans"][p]["bits"][layer["group"]] for p in plans})
        total += held_bytes(*layer["shape"], report["group_size"], views) - layer["float_bytes"]
    return total


def _static(bits: int):
    def make(model: VLAPolicy, ctx: BuildContext) -> RobotPolicy:
        cm = kiln_artifact(model, {**STATIC_PLANS, **DYQ_PLANS}, ctx)
        plan = f"w{bits}"
        return StaticPolicy(f"static{bits}", kiln_step(cm, plan), kiln_plan(cm, plan),
                            kiln_weight_bytes(model, cm, [plan]))
    return make


for _b in (8, 4, 2):
    register(f"static{_b}")(_static(_b))


@register("dyq")
def _dyq(model: VLAPolicy, ctx: BuildContext) -> RobotPolicy:
    from kiln.runtime.precision import DyQPolicy

    cm = kiln_artifact(model, {**STATIC_PLANS, **DYQ_PLANS}, ctx)
    plans = {p: kiln_plan(cm, p) for p in DYQ_PLANS}
    selector = DyQPolicy({p: plan.avg_bits for p, plan in plans.items()})
    return SwitchingPolicy("dyq", {p: kiln_step(cm, p) for p in plans}, plans, selector,
                           kiln_weight_bytes(model, cm, list(plans)))


@register("static-matched")
def _static_matched(model: VLAPolicy, ctx: BuildContext) -> RobotPolicy:
    """The static plan kiln allocates (by sensitivity) at the average bits DyQ ran this task at."""
    if "dyq" not in ctx.results:
        raise NotAvailable("static-matched: needs the dyq result of the same task (run dyq with it)")
    budget = min(max(ctx.results["dyq"].avg_bits, 2.0), 8.0)
    cm = kiln_artifact(model, {"matched": budget}, ctx)
    return StaticPolicy("static-matched", kiln_step(cm, "matched"), kiln_plan(cm, "matched"),
                        kiln_weight_bytes(model, cm, ["matched"]))
