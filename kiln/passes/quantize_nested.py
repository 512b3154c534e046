"""Nested weight quantization (DyQ-VLA): linear weights held once, every plan's bit-width read from them.

What it does, when ``CompileOptions.quantization`` is a :class:`NestedQuantization`
(otherwise nothing):

1. Every ``aten.linear`` whose weight is a graph weight ``[N, K]`` with ``K`` a
   multiple of the group size is a candidate; each belongs to a *group*:
   ``layer<i>.<role>`` inside a transformer layer (``annotate_regions`` must
   run first), its own module path elsewhere (``lm_head``). Others stay float
   (listed in the report).
2. Each plan is resolved to a bit-width per group: a plan is either a dict
   (``{"default": 4, "layer0.attention": 8}``) or an average-bit budget (a
   float), allocated from a sensitivity profile measured on the calibration
   set (``CompileOptions.calibration``, else the example inputs): for each
   group and bit-width, the output's relative squared error with only that
   group's weights at that view (the rest float); then the bits per group
   with the least summed error whose weight-weighted average is within the
   budget (:func:`allocate`, an exact knapsack).
3. Each candidate weight is encoded once (``kiln.ir.nested``) holding the views
   some plan uses for it (the ``lo`` plane only where a plan reads 8 bits), and
   its node becomes ``kiln::nested_linear`` over the default plan's view. The
   graph keeps every plan (``Graph.plans``: plan -> node -> bits); lowering
   compiles one program per plan over the one weight store, and the plan is a
   run-time control that picks the program (``CompiledModel.controls["plan"]``).

Needs: ``annotate_regions`` before it (groups by layer and role). The report
(``Graph.quantization``, stored in the manifest and shown by ``kiln inspect``)
lists every plan's bits per group and average bits, bytes per layer and in
total, each view's weight error, and the sensitivity profile.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from ..errors import KilnError
from ..ir import Graph, QuantSpec
from ..ir.nested import BLOCK, PLANES_OF, VIEWS, NestedWeight, encode, view_error
from ..ir.rewrite import node_arg, replace_node
from .base import Pass, PassContext, PassResult, register_pass

NESTED_LINEAR = torch.ops.kiln.nested_linear.default


@dataclass
class NestedQuantization:
    """What ``quantize_nested`` does: the views held, the group size and the plans.

    ``plans``: plan name -> ``{group or "default": bits}`` or an average-bit
    budget (float) to allocate by sensitivity. The first plan is the default.
    """

    plans: dict[str, dict[str, int] | float] = field(default_factory=lambda: {"w8": {"default": 8},
                                                                              "w4": {"default": 4},
                                                                              "w2": {"default": 2}})
    views: tuple[int, ...] = VIEWS
    group_size: int = BLOCK
    default_plan: str | None = None

    def __post_init__(self):
        self.views = tuple(sorted(set(self.views), reverse=True))
        if not self.views or set(self.views) - set(VIEWS):
            raise KilnError(f"NestedQuantization.views must be some of {VIEWS}, not {self.views}")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % BLOCK:
            raise KilnError(f"NestedQuantization.group_size must be a multiple of {BLOCK}, not {self.group_size!r}")
        if not isinstance(self.plans, dict) or not self.plans:
            raise KilnError("NestedQuantization.plans must be a non-empty dict of plan name -> "
                            "{group: bits} or an average-bit budget")
        for name, plan in self.plans.items():
            where = f"NestedQuantization.plans[{name!r}]"
            if isinstance(plan, bool) or not isinstance(plan, (dict, int, float)):
                raise KilnError(f"{where} must be a dict of group -> bits or an average-bit budget, not {plan!r}")
            if isinstance(plan, (int, float)) and not min(self.views) <= plan <= max(self.views):
                raise KilnError(f"{where}: a budget of {plan} bits is outside the views {self.views}")
            if isinstance(plan, dict):
                bad = {g: b for g, b in plan.items() if b not in self.views}
                if bad:
                    raise KilnError(f"{where}: bits {bad} are not among the views {self.views}")
        if self.default_plan is None:
            self.default_plan = next(iter(self.plans))
        elif self.default_plan not in self.plans:
            raise KilnError(f"NestedQuantization.default_plan {self.default_plan!r} is not one of the plans "
                            f"{list(self.plans)}")


def group_of(graph: Graph, node: fx.Node) -> str:
    """``layer<i>.<role>`` inside a transformer layer; else the linear's own module path (``lm_head``)."""
    meta = graph.meta(node)
    if meta.layer is not None:
        return f"layer{meta.layer}.{meta.role}"
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else node.name


def candidates(graph: Graph, group_size: int) -> tuple[list[fx.Node], list[str]]:
    """The linears this pass can quantize, and the names of those it leaves float (with why)."""
    chosen, left = [], []
    for node in graph.compute_nodes():
        if node.target is not torch.ops.aten.linear.default:
            continue
        weight = node.args[1]
        bias = node_arg(node, 2, "bias")
        if not (isinstance(weight, fx.Node) and graph.is_weight(weight)) or (
                bias is not None and not (isinstance(bias, fx.Node) and graph.is_weight(bias))):
            left.append(f"{node.name} (its weight is computed, not a stored weight)")
        elif graph.weights[weight.name].shape[-1] % group_size or not graph.weights[weight.name].is_floating_point():
            left.append(f"{node.name} ({graph.weights[weight.name].shape[-1]} inputs: not a multiple of {group_size})")
        else:
            chosen.append(node)
    return chosen, left


def sensitivity(graph: Graph, nodes: list[fx.Node], encoded: dict[fx.Node, NestedWeight],
                samples: list[list[torch.Tensor]]) -> dict[str, dict[int, float]]:
    """Per group and view: the outputs' relative squared error with only that group's weights at that view."""
    by_group: dict[str, list[fx.Node]] = defaultdict(list)
    for n in nodes:
        by_group[group_of(graph, n)].append(n)
    reference = [graph.run(s) for s in samples]
    views = next(iter(encoded.values())).views
    profile: dict[str, dict[int, float]] = {}
    for group, members in by_group.items():
        profile[group] = {}
        for bits in views:
            weights = dict(graph.weights)
            for n in members:
                weights[n.args[1].name] = encoded[n].dequantize(bits).to(graph.weights[n.args[1].name].dtype)
            probe = Graph(graph.gm, weights, graph.signature, graph.name)
            profile[group][bits] = _relative_error([probe.run(s) for s in samples], reference)
    return profile


def _relative_error(outputs: list[list], reference: list[list]) -> float:
    num = den = 0.0
    for got, want in zip(outputs, reference):
        for g, w in zip(got, want):
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                num += (g.double() - w.double()).pow(2).sum().item()
                den += w.double().pow(2).sum().item()
    return num / den if den > 0 else 0.0


def allocate(sizes: dict[str, int], profile: dict[str, dict[int, float]], budget: float,
             views: tuple[int, ...], resolution: int = 4096) -> dict[str, int]:
    """Bits per group minimising the summed error, with a weight-weighted average of at most ``budget`` bits.

    The errors are taken as additive across groups (each measured alone). An
    exact multiple-choice knapsack by dynamic programming over the bit budget,
    in steps of ``1 / resolution`` bit per weight (each choice's cost rounded
    up, so the result never exceeds the budget); ties go to fewer bits.
    """
    groups = list(sizes)
    ladder = sorted(views)
    total = sum(sizes.values())
    capacity = int(budget * resolution + 1e-9)
    costs = {g: [-(-sizes[g] * b * resolution // total) for b in ladder] for g in groups}  # ceil
    if sum(c[0] for c in costs.values()) > capacity:
        return {g: ladder[0] for g in groups}  # the narrowest view everywhere is the least any plan can hold
    inf = float("inf")
    best = np.zeros(capacity + 1)  # best[c]: the least error of the groups so far within cost c
    picks = np.zeros((len(groups), capacity + 1), dtype=np.int8)
    for i, g in enumerate(groups):
        new = np.full(capacity + 1, inf)
        for j in range(len(ladder) - 1, -1, -1):  # widest first, so a tie keeps the narrower choice
            cost = costs[g][j]
            if cost > capacity:
                continue
            candidate = np.full(capacity + 1, inf)
            candidate[cost:] = best[:capacity + 1 - cost] + profile[g][ladder[j]]
            better = candidate <= new
            new = np.where(better, candidate, new)
            picks[i] = np.where(better, j, picks[i])
        best = new
    chosen, c = {}, int(np.argmin(best))
    for i in range(len(groups) - 1, -1, -1):
        j = int(picks[i][c])
        chosen[groups[i]] = ladder[j]
        c -= costs[groups[i]][j]
    return {g: chosen[g] for g in groups}


@register_pass
class QuantizeNested(Pass):
    name = "quantize_nested"
    requires = ("annotate_regions",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        config = getattr(ctx.options, "quantization", None)
        if config is None:
            return PassResult(False, {"quantized": 0})
        nodes, left = candidates(graph, config.group_size)
        if not nodes:
            raise KilnError("quantize_nested: the model has no linear layer it can quantize"
                            + (f" ({'; '.join(left[:5])})" if left else ""))
        sizes: dict[str, int] = defaultdict(int)
        for n in nodes:
            sizes[group_of(graph, n)] += graph.weights[n.args[1].name].numel()
        # Each weight encoded once, serving every view; a layer keeps only the views its plans read.
        encoded = {n: encode(graph.weights[n.args[1].name], config.group_size, config.views) for n in nodes}
        profile = None
        if any(isinstance(p, (int, float)) for p in config.plans.values()):
            samples = ctx.calibration if ctx.calibration is not None else [ctx.real_inputs]
            profile = sensitivity(graph, nodes, encoded, samples)
        group_plans = {name: (allocate(sizes, profile, float(plan), config.views)
                              if isinstance(plan, (int, float)) else _explicit(plan, sizes, name))
                       for name, plan in config.plans.items()}
        report = {"group_size": config.group_size, "views": list(config.views), "default_plan": config.default_plan,
                  "plans": {}, "layers": {}, "left_float": left,
                  **({"sensitivity": {g: {str(b): e for b, e in p.items()} for g, p in profile.items()}}
                     if profile else {})}
        total_weights = sum(sizes.values())
        for name, bits in group_plans.items():
            report["plans"][name] = {"bits": bits, "avg_bits": sum(sizes[g] * b for g, b in bits.items()) / total_weights}
        graph.plans = {name: {} for name in group_plans}
        for n in nodes:
            self._rewrite(graph, n, encoded.pop(n), group_plans, config, report)
        graph.default_plan = config.default_plan
        graph.quantization = report
        return PassResult(True, {"quantized": len(nodes), "left_float": len(left), "plans": len(group_plans)})

    def _rewrite(self, graph: Graph, node: fx.Node, full: NestedWeight, group_plans: dict,
                 config: NestedQuantization, report: dict) -> None:
        group = group_of(graph, node)
        x, weight_node = node.args[0], node.args[1]
        bias = node_arg(node, 2, "bias")
        weight = graph.weights[weight_node.name]
        held = tuple(sorted({plan[group] for plan in group_plans.values()}, reverse=True))
        nested = full.keeping(held)
        base = weight_node.name
        source = graph.weight_sources.get(base)
        added = {}
        with graph.fx.inserting_before(node):
            for plane, tensor in nested.planes.items():
                added[plane] = graph.add_weight(f"{base}_{plane}", tensor, source and f"{source}:{plane}")
            for bits, tensor in nested.scales.items():
                added[f"scale{bits}"] = graph.add_weight(f"{base}_scale{bits}", tensor, source and f"{source}:scale{bits}")
            added["zero"] = graph.add_weight(f"{base}_zero", nested.zero, source and f"{source}:zero")
        bits = group_plans[config.default_plan][group]
        new = replace_node(graph.fx, node, NESTED_LINEAR, nested_args(x, added, bias, bits, config.group_size))
        new.meta["kiln_nested"] = {k: v.name for k, v in added.items()}
        _use_view(graph, new, added, held, bits)
        for name, plan in group_plans.items():
            graph.plans[name][new.name] = plan[group]
        if not weight_node.users:
            graph.remove_weight(weight_node)
        report["layers"][new.name] = {
            "group": group, "weight": source or base, "shape": list(weight.shape), "views": list(held),
            "bytes": nested.nbytes(), "float_bytes": weight.numel() * weight.element_size(),
            "bytes_read": {str(b): nested.nbytes(b) for b in held},
            "error": {str(b): view_error(weight, nested, b) for b in held}}


def _use_view(graph: Graph, node: fx.Node, added: dict, held: tuple[int, ...], bits: int) -> None:
    """Point the nested linear ``node`` at the ``bits``-bit view of the weights in ``added`` (args and QuantSpec)."""
    x, bias, group_size = node.args[0], node.args[6], node.args[8]
    node.args = nested_args(x, added, bias, bits, group_size)
    graph.meta(node).quant = QuantSpec("nested", held, scale=added[f"scale{bits}"].name, zero_point=added["zero"].name,
                                       axis=0, group_size=group_size, layout="nested-msb")


def nested_args(x, added: dict, bias, bits: int, group_size: int) -> tuple:
    """The arguments of ``kiln::nested_linear`` over the ``bits``-bit view of the weights in ``added``."""
    planes = [added[p] if p in PLANES_OF[bits] else None for p in ("hi", "mid", "lo")]
    return (x, *planes, added[f"scale{bits}"], added["zero"], bias, bits, group_size)


def _explicit(plan: dict[str, int], sizes: dict[str, int], name: str) -> dict[str, int]:
    unknown = sorted(set(plan) - set(sizes) - {"default"})
    if unknown:
        raise KilnError(f"NestedQuantization.plans[{name!r}] names groups {unknown} the model does not have; "
                        f"its groups: {', '.join(sorted(sizes))}")
    missing = [g for g in sizes if g not in plan and "default" not in plan]
    if missing:
        raise KilnError(f"NestedQuantization.plans[{name!r}] gives no bits for groups {missing} (add \"default\")")
    return {g: plan.get(g, plan.get("default")) for g in sizes}


def apply_plan(graph: Graph, plan: str) -> None:
    """Point every nested linear of ``graph`` at the view ``plan`` gives it (a program per plan is lowered so)."""
    try:
        bits_of = graph.plans[plan]
    except KeyError:
        raise KilnError(f"graph {graph.name} has no plan {plan!r}; its plans: {list(graph.plans)}") from None
    weights = {n.name: n for n in graph.weight_nodes()}
    for node in graph.compute_nodes():
        if node.target is NESTED_LINEAR and node.name in bits_of:
            added = {k: weights[v] for k, v in node.meta["kiln_nested"].items()}
            _use_view(graph, node, added, graph.meta(node).quant.bits, bits_of[node.name])
