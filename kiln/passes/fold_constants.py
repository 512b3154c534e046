"""Evaluate, once at compile time, every subgraph that depends only on weights.

A node is foldable when it is a pure ATen op whose inputs are all weights or
foldable nodes (ops with no inputs, such as ``arange`` over a static size,
count too; random ops and ops with side effects, such as collectives, never
do: ``kiln.ir.collectives.has_side_effects``). Each foldable value that a non-foldable node
reads becomes a new weight, and the subgraph that computed it is removed.
A value much larger than what it is computed from (e.g. a materialised mask)
is not folded: it would trade a cheap op for memory. Needs nothing before it;
under dynamic shapes, anything that depends on an input's size is not folded.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir import Graph
from ..ir.collectives import has_side_effects
from .base import Pass, PassContext, PassResult, register_pass

# A folded value may be this many elements even when its inputs are smaller.
_MIN_SIZE_LIMIT = 1 << 16


@register_pass
class FoldConstants(Pass):
    name = "fold_constants"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        foldable = _foldable_nodes(graph)
        if not foldable:
            return PassResult(False, {"folded": 0, "nodes_removed": 0})
        values = _evaluate(graph, foldable)
        folded = 0
        for node in [n for n in graph.fx.nodes if n in foldable]:
            if not any(u not in foldable for u in node.users):
                continue
            value = values[node]
            if not isinstance(value, torch.Tensor) or value.numel() > _size_limit(graph, node):
                continue
            weight = graph.add_weight(f"_folded_{node.name}", value.contiguous())
            node.replace_all_uses_with(weight, delete_user_cb=lambda u: u not in foldable)
            folded += 1
        removed = 0
        for node in reversed([n for n in graph.fx.nodes if n in foldable]):
            if not node.users:
                graph.fx.erase_node(node)
                removed += 1
        return PassResult(folded > 0 or removed > 0, {"folded": folded, "nodes_removed": removed})


def _is_pure_op(node: fx.Node) -> bool:
    t = node.target
    return (node.op == "call_function" and not has_side_effects(node)
            and not (isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags))


def _foldable_nodes(graph: Graph) -> set[fx.Node]:
    foldable: set[fx.Node] = set()
    for node in graph.fx.nodes:
        if _is_pure_op(node) and all(graph.is_weight(i) or i in foldable for i in node.all_input_nodes):
            foldable.add(node)
    return foldable


def _evaluate(graph: Graph, foldable: set[fx.Node]) -> dict[fx.Node, object]:
    env: dict[fx.Node, object] = {n: graph.weights[n.name] for n in graph.weight_nodes()}
    with torch.no_grad():
        for node in graph.fx.nodes:
            if node in foldable:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
                env[node] = node.target(*args, **kwargs)
    return env


def _size_limit(graph: Graph, node: fx.Node) -> int:
    seen, stack, inputs = set(), [node], 0
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if graph.is_weight(n):
            inputs += graph.weights[n.name].numel()
        stack.extend(n.all_input_nodes)
    return max(inputs, _MIN_SIZE_LIMIT)
