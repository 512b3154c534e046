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

Where the rest of issue 10 plugs in:

- ``static8`` / ``static4`` / ``static2`` here are a **placeholder reference**:
  plain-torch fake quantization (asymmetric min-max codes per group of 128
  input channels, fp16 scale and zero point per group) applied to copies of
  the linear weights -- accuracy only, no kernels, one copy per bit-width.
  kiln's nested-weight quantization pass replaces them: its compiled program
  becomes ``step_fn(plan)`` (the plan a run-time control), its byte count
  ``weight_bytes``.
- ``static-matched`` (the static per-layer plan at DyQ's average bits) is
  :class:`StaticPolicy` over a per-layer plan from the allocation pass;
- ``dyq`` is a :class:`SwitchingPolicy` whose ``selector`` is the kinematic
  policy of ``kiln.runtime`` reading :class:`~kinematics.KinematicSignals`.

Until those land, ``static-matched`` and ``dyq`` are registered as
:class:`NotAvailable` and the harness reports them as not run.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .kinematics import KinematicSignals
from .model import VLAPolicy

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
FP32_BITS = 32
GROUP = 128


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


# ---------------------------------------------------------------- accounting and the placeholder quantizer

def quantizable_linears(model: VLAPolicy) -> dict[str, nn.Linear]:
    """The linears a bit-width plan covers: every projection of the decoder blocks and the action head (the
    observation projectors and embeddings stay fp32: they are 1% of the weights)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (n.startswith("blocks.") or n == "head")}


def fp32_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def plan_avg_bits(model: VLAPolicy, bits: dict[str, int]) -> float:
    """Mean bits per weight of a per-layer plan over the quantizable linears (weighted by weight count)."""
    lin = quantizable_linears(model)
    total = sum(m.weight.numel() for m in lin.values())
    return sum(m.weight.numel() * bits[n] for n, m in lin.items()) / total


def fake_quant_weight(w: torch.Tensor, bits: int, group: int = GROUP) -> torch.Tensor:
    """PLACEHOLDER reference quantizer (until kiln's pass lands): asymmetric min-max codes in
    ``[0, 2^bits)`` per group of ``group`` input channels (per output channel when the row is shorter),
    scale and zero point rounded to fp16 as stored; returns the dequantized weight."""
    out_f, in_f = w.shape
    g = group if in_f % group == 0 else in_f
    wg = w.detach().reshape(out_f, in_f // g, g).double()
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half().double()
    zero = (-lo / scale).round().clamp(0, levels)
    q = (wg / scale + zero).round().clamp(0, levels)
    return ((q - zero) * scale).reshape(out_f, in_f).to(w.dtype)


def quantized_bytes(model: VLAPolicy, bits: dict[str, int], group: int = GROUP) -> int:
    """Bytes held by a per-layer plan: codes at their bits, 4 bytes (fp16 scale + zero) per group, every other
    tensor (biases, embeddings, norms, projectors, normalisation buffers) in fp32."""
    lin = quantizable_linears(model)
    total = fp32_bytes(model)
    for n, m in lin.items():
        out_f, in_f = m.weight.shape
        groups = out_f * (in_f // (group if in_f % group == 0 else in_f))
        total += -m.weight.numel() * 4 + (m.weight.numel() * bits[n] + 7) // 8 + 4 * groups
    return total


def fake_quantized_copy(model: VLAPolicy, bits: dict[str, int]) -> VLAPolicy:
    """A copy of ``model`` with each quantizable linear's weight fake-quantized at ``bits[name]``."""
    q = copy.deepcopy(model).eval()
    for n, m in quantizable_linears(q).items():
        with torch.no_grad():
            m.weight.copy_(fake_quant_weight(m.weight, bits[n]))
    return q


# ---------------------------------------------------------------- the registry

@dataclass
class BuildContext:
    """What a configuration may read when it is built for a task: the task, and the results
    (:class:`sim.EvalResult`, by configuration name) of the configurations already run on it."""
    task: str = ""
    results: dict[str, Any] = field(default_factory=dict)


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


def _static(bits: int):
    def make(model: VLAPolicy, ctx: BuildContext) -> RobotPolicy:
        plan = {n: bits for n in quantizable_linears(model)}
        return StaticPolicy(f"static{bits}", fake_quantized_copy(model, plan), Plan(str(bits), float(bits)),
                            quantized_bytes(model, plan))
    return make


for _b in (8, 4, 2):
    register(f"static{_b}")(_static(_b))


def _not_available(name: str, what: str):
    def make(model: VLAPolicy, ctx: BuildContext) -> RobotPolicy:
        raise NotAvailable(f"{name}: {what}")
    return make


register("static-matched")(_not_available(
    "static-matched", "needs the sensitivity-based allocation (issue 10 item 2) at DyQ's measured average bits"))
register("dyq")(_not_available(
    "dyq", "needs the nested-weight pass and the kinematic policy (issue 10 items 1, 3, 5)"))
