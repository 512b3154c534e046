"""Library dispatch, the mechanism: FX nodes that run as library kernels called from the TVM library.

The first stage of every TVM target's pipeline, like TVM's
``library_dispatch_passes``, but on the FX graph: an ATen node says exactly
what a library kernel computes (``linear``'s transposed weight,
``scaled_dot_product_attention``'s bool mask, scale and GQA flags), so nothing
has to be recovered from a decomposed Relax pattern.

A target supplies its rules as a :class:`LibraryDispatch` (the CPU's:
``kiln/backends/cpu/dispatch.py``, PyTorch's CPU kernels). Each rule names the
packed function the converter emits with ``R.call_dps_packed``; the runtime
registers a function of that name (for the CPU, in
``kiln/runtime/kernels/tvm_dispatch.py``), and ``abi`` is the version of those
functions' argument lists, recorded in the spec. Scalar attributes travel as
``R.prim_value`` arguments before the output. Rules marked ``returns`` are
emitted as ``R.call_pure_packed`` instead and hand the library's result
tensor to TVM. ``LibraryDispatch.plan`` only reads the graph; it must run
before conversion.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

# Packed-function argument list for one node: FX arguments (tensors) and Python
# scalars; the converter turns tensors into Relax values and scalars into prim values.
Args = list

Plan = dict  # fx.Node -> (DispatchRule, Args)


@dataclass(frozen=True)
class DispatchRule:
    name: str  # the rule, for the report and tests
    op: torch._ops.OpOverload
    function: str  # the registered packed function it calls
    args: Callable[[fx.Node], Args | None]  # None: the rule does not apply to this node
    # True: the function returns its result (a library tensor handed to TVM by DLPack, no copy)
    # instead of writing into a TVM-allocated destination; for ops without ``out=`` (attention).
    returns: bool = False
    # True: when the first argument is bf16, the converter computes its non-finite flag with a TVM kernel
    # before the call (``finite.emit_nonfinite_flag``: int32[1], 1 for a NaN or +-inf anywhere) and passes it
    # last, so the function picks its path for non-finite inputs without reading the input again.
    finite_flag: bool = False
    # A rule that computes its node's producers in its own call (a bf16 linear's GELU and the casts around it):
    # the nodes it takes, which then run in this call only (not planned, not converted). Such a rule's op is
    # not library-only: a node of it that the rule does not take is lowered as usual.
    absorbs: Callable[[fx.Node], list[fx.Node]] | None = None


def plan_dispatch(gm: fx.GraphModule, rules) -> Plan:
    """The nodes of ``gm`` that go to the library, with the first of ``rules`` that takes each and its arguments."""
    by_op: dict = {}
    for rule in rules:
        by_op.setdefault(rule.op, []).append(rule)
    plan = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for rule in by_op.get(node.target, ()):
            args = rule.args(node)
            if args is not None:
                plan[node] = (rule, args)
                break
    for node in absorbed(plan):
        plan.pop(node, None)
    return plan


def absorbed(plan: Plan) -> dict[fx.Node, fx.Node]:
    """The nodes that run inside another node's call (``DispatchRule.absorbs``), each with that node."""
    return {n: node for node, (rule, _) in plan.items() if rule.absorbs is not None for n in rule.absorbs(node)}


def _as_planned(rule: DispatchRule, args: Args, _constants: dict) -> tuple[DispatchRule, Args]:
    return rule, args


@dataclass(frozen=True)
class LibraryDispatch:
    """One target's library dispatch: its rules, their ABI, and how the converter emits them."""

    rules: tuple[DispatchRule, ...]  # tried in order for each node; the first that applies is planned
    abi: int  # the version of the functions' argument lists, recorded in the spec (the loader checks it)
    # A cheaper equivalent call once constant inputs are known (folded values and weights);
    # called by the converter with (rule, args, {fx.Node: tensor}).
    specialize: Callable[[DispatchRule, Args, dict], tuple[DispatchRule, Args]] = _as_planned
    # Rules whose output is written [B, S, H, D] (the FX node's value is its transpose(1, 2)).
    heads_last_output: frozenset[str] = frozenset()

    def plan(self, gm: fx.GraphModule) -> Plan:
        return plan_dispatch(gm, self.rules)

    @functools.cached_property
    def dispatched_ops(self) -> frozenset:
        """Ops that run only as library calls: a node of one of these that no rule takes
        (another dtype, a 1-D embedding table, a string padding) is not lowered to TIR."""
        return frozenset(rule.op for rule in self.rules if rule.absorbs is None)

    def dispatches(self, node: fx.Node) -> bool:
        """Whether a rule takes ``node``."""
        return any(rule.op == node.target and rule.args(node) is not None for rule in self.rules)


def heads_last_source(node) -> fx.Node | None:
    """``x`` when ``node`` is ``x.transpose(1, 2)`` of a 4-D ``x``: a [B, S, H, D] tensor seen as [B, H, S, D]."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.transpose.int):
        return None
    x = node.args[0]
    if not isinstance(x, fx.Node) or x.meta["val"].dim() != 4 or sorted(d % 4 for d in node.args[1:3]) != [1, 2]:
        return None
    return x
