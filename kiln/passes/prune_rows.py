"""Compute only the rows that reach an output: move row slices above the ops that produce them.

A classifier that reads one token (ViT's ``logits = head(norm(h)[:, 0])``) or
last-token pooling (``h[:, -1]``) keeps one row of a sequence, but every op
before the selection computes all of them: in a ViT's last layer, the query
projection, attention, output projection, MLP and final norm run on 197
tokens to keep one. This pass rewrites ``slice(f(x))`` into ``f(slice(x))``
for ops ``f`` that compute each row of the sliced axis from the same row of
their inputs, and repeats on the new slices, so only the kept rows are
computed. The per-op rules (which ops it moves through, on which axes) are
the named table :data:`kiln.ir.rows.ROW_RULES`: point-wise ops, norms and
reductions over other axes, GEMMs on their row axis, embeddings, views that
keep the leading axes, transposes, and attention's query rows (keys and
values stay whole). Each narrowed op is logged at DEBUG with its rule's name.
The new nodes keep the module stack, layer, role and placement of the node
they replace (:mod:`kiln.ir.rewrite`).

An op is rewritten only when every user of its value is the same slice, so
no value is computed twice; several identical slices (a residual read by two
branches that were both narrowed) merge into one. ``select`` (``h[:, 0]``)
counts as a one-row slice. The pass stops at anything else: ops that mix
rows (attention's keys, cumulative sums, reductions over the axis), graph
inputs, weights, values that something else reads whole.

Best after ``eliminate_dead_code``: a dead reader keeps a value whole.
Static shapes only (a symbolic size leaves the graph as it is). Numerics:
every kept row goes through the same ops, but a GEMM over fewer rows may be
a different kernel (MKL runs one row as a GEMV) and sum in another order, so
outputs equal eager's to fp32 rounding, not bitwise.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.fx as fx

from ..ir import Graph
from ..ir.rewrite import insert_node
from ..ir.rows import SLICE, narrow, plan_rows, rows_of, static, val
from .base import Pass, PassContext, PassResult, register_pass

log = logging.getLogger("kiln")
aten = torch.ops.aten


@register_pass
class PruneRows(Pass):
    name = "prune_rows"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        g = graph.fx
        seeds = _slice_selects(g)
        fired: Counter[str] = Counter()
        erased: set[fx.Node] = set()
        changed = True
        while changed:
            changed = False
            for node in list(g.nodes):
                if node in erased or node.target is not SLICE:
                    continue  # erased earlier in this sweep, or not a slice
                rows = rows_of(node)
                source = node.args[0]
                if rows is None or not isinstance(source, fx.Node) or source.op != "call_function":
                    continue
                if not all(u.target is SLICE and rows_of(u) == rows and u.args[0] is source
                           for u in source.users):
                    continue  # something else reads the value whole
                plan = plan_rows(source, rows)
                if plan is None:
                    continue
                log.debug("kiln: prune_rows: %s (rule %s) on rows %d:%d of axis %d", source.name, plan.rule,
                          rows.start, rows.end, rows.dim)
                erased |= narrow(g, source, rows, plan)
                fired[plan.rule] += 1
                changed = True
        # A select whose slice moved nowhere goes back to what it was.
        for select, rows, (x, dim, index) in seeds:
            if rows not in erased:
                select.args = (x, dim, index)
                g.erase_node(rows)
        return PassResult(bool(fired), {"ops_narrowed": sum(fired.values())})


def _slice_selects(g: fx.Graph) -> list[tuple[fx.Node, fx.Node, tuple]]:
    """Rewrite each ``select(x, d, i)`` of an op's output as ``select(slice(x, d, i, i + 1), d, 0)``.

    Returns (select, its new slice, its old arguments) per rewrite.
    """
    seeds = []
    for node in list(g.nodes):
        if node.target is not aten.select.int:
            continue
        x, dim, index = node.args
        v = val(x)
        if v is None or not static(v) or x.op != "call_function" or v.shape[dim] == 1:
            continue
        dim %= v.dim()
        index %= v.shape[dim]
        rows = insert_node(g, SLICE, (x, dim, index, index + 1), origin=node, val=v.narrow(dim, index, 1))
        seeds.append((node, rows, node.args))
        node.args = (rows, dim, 0)
    return seeds
