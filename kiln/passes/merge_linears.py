"""Linears that read one input become one linear on their weights concatenated.

What it does: linears (``aten.linear``) that read the same input value, each
on a stored weight (and a stored bias: all or none), with weights of one dtype,
become one linear whose weight (and bias) is theirs concatenated along the
output features; each original result is a column slice of the merged result,
copied contiguous as the linear's own result was (the ``cpu`` backend fuses the
copy into the slice's kernel). So attention's q, k and v projections, and a
SwiGLU's gate and up, run as one wider GEMM and one library call each: fewer
calls (each costs the runtime 15-25 us here), one packed weight instead of
three, and a wider N that the GEMM libraries run at a higher rate (measured:
fp32 MKL on a packed weight, 128 rows, MiniLM's three 384x384 projections 297
us against 276 us merged; bf16 Llama prefill 15.5 -> 14.7 ms).

Numerics: the same products and sums for every output column. MKL's sgemm gave
bitwise the merged and the separate results on every shape checked (128 and
197 rows, K 384-2048, ``tests/passes/test_merge_linears.py``); a GEMM library
may block the wider N another way, so this is promised to the compiled
model's fp32 tolerance, not bitwise. Weights: a linear joins only when nothing
but linears of its group read its weight and bias, so the originals go and the
stored bytes stay the same (a weight tied to another op, or to a linear on
another input, or given two biases, stays apart: merged, it would be stored
twice). A linear repeated on one input (the same weight and bias) reads the
merged one's result.

What it needs before it: the float graph after the cleanup and quantize stages
(their linears are already ``kiln::`` ops and are left alone) and after
``lower_precision`` (whose bf16 linears read one shared cast of their input, so
they merge too); before ``place``, which places the merged linear like any
other.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from ..ir import Graph
from ..ir.rewrite import insert_node, node_arg
from .base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten
LINEAR = aten.linear.default


# annotations an earlier pass sets to keep nodes apart; linears differing in one stay apart
SEPARATING = ("placement", "queue", "program", "chunk", "stage")


def _bias(node: fx.Node):
    return node_arg(node, 2, "bias")


@register_pass
class MergeLinears(Pass):
    name = "merge_linears"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups: dict[tuple, list[fx.Node]] = {}
        for node in graph.compute_nodes():
            if node.target is not LINEAR or not isinstance(node.args[0], fx.Node):
                continue
            w, b = node.args[1], _bias(node)
            if not graph.is_weight(w) or (b is not None and not graph.is_weight(b)):
                continue
            weight = graph.weights[w.name]
            if weight.dim() != 2 or (b is not None and graph.weights[b.name].dtype != weight.dtype):
                continue
            annotations = tuple(getattr(graph.meta(node), field) for field in SEPARATING)
            groups.setdefault((node.args[0], b is not None, weight.dtype, annotations), []).append(node)
        merged = sizes = 0
        for (_, has_bias, _, _), nodes in groups.items():
            # one linear per (weight, bias); a repeat reads the first one's result. A weight (or bias) read by
            # anything outside the group, or given two biases, stays apart: merged, it would be stored twice
            by_params: dict[tuple, list[fx.Node]] = {}
            for node in nodes:
                by_params.setdefault((node.args[1], _bias(node)), []).append(node)
            uses = Counter(w for w, _ in by_params)
            members = set(nodes)
            kept = {key: same for key, same in by_params.items() if uses[key[0]] == 1
                    and all(u in members for p in key if p is not None for u in p.users)}
            if len(kept) < 2:
                continue
            results = _merge(graph, [same[0] for same in kept.values()], has_bias)
            for same, result in zip(kept.values(), results):
                for repeat in same[1:]:
                    repeat.replace_all_uses_with(result)
                    graph.fx.erase_node(repeat)
            _drop_unread(graph, [p for key in kept for p in key if p is not None])
            merged += sum(len(same) for same in kept.values())
            sizes += 1
        return PassResult(merged > 0, {"merged_linears": merged, "groups": sizes})


def _merge(graph: Graph, nodes: list[fx.Node], has_bias: bool) -> list[fx.Node]:
    """``nodes`` (linears on one input, in graph order) as one linear and a contiguous column slice each (returned,
    in order)."""
    ws = [n.args[1] for n in nodes]
    bs = [_bias(n) for n in nodes] if has_bias else []
    sizes = [graph.weights[w.name].shape[0] for w in ws]

    def cat(parts: list[fx.Node]) -> fx.Node:
        sources = [graph.weight_sources.get(p.name, p.name) for p in parts]
        return graph.add_weight(f"{parts[0].name}_merged", torch.cat([graph.weights[p.name] for p in parts]),
                                f"cat({', '.join(sources)})")
    first = nodes[0]
    args = (first.args[0], cat(ws), cat(bs)) if has_bias else (first.args[0], cat(ws))
    val = first.meta["val"]
    whole = insert_node(graph.fx, LINEAR, args, origin=first, before=first,
                        val=val.new_empty(*val.shape[:-1], sum(sizes)))
    start, last, results = 0, val.dim() - 1, []
    for node, size in zip(nodes, sizes):
        part = insert_node(graph.fx, aten.slice.Tensor, (whole, last, start, start + size), origin=node,
                           before=node, val=node.meta["val"])
        # a contiguous copy, as the linear's result was (a later view may need it)
        dense = insert_node(graph.fx, aten.clone.default, (part,), {"memory_format": torch.contiguous_format},
                            origin=node, before=node, val=node.meta["val"])
        node.replace_all_uses_with(dense)
        graph.fx.erase_node(node)
        results.append(dense)
        start += size
    return results


def _drop_unread(graph: Graph, weights: list[fx.Node]) -> None:
    for p in dict.fromkeys(weights):
        if not p.users:
            graph.remove_weight(p)
