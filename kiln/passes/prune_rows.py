"""Compute only the rows that reach an output: move row slices above the ops that produce them.

A classifier that reads one token (ViT's ``logits = head(norm(h)[:, 0])``) or
last-token pooling (``h[:, -1]``) keeps one row of a sequence, but every op
before the selection computes all of them: in a ViT's last layer, the query
projection, attention, output projection, MLP and final norm run on 197
tokens to keep one. This pass rewrites ``slice(f(x))`` into ``f(slice(x))``
for ops ``f`` that compute each row of the sliced axis from the same row of
their inputs, and repeats on the new slices, so only the kept rows are
computed. It moves through:

- point-wise ops (``torch.Tag.pointwise``: activations, arithmetic with
  broadcasting; an operand broadcast along the axis is left whole), casts,
  clones;
- norms and reductions over other axes (``layer_norm``, ``softmax``,
  ``mean``/``sum``/``amax`` over the trailing axis: RMS norm);
- GEMMs on their row axis (``linear``, ``addmm``, ``mm``, ``matmul``, ``bmm``),
  embedding lookups;
- ``view``/``reshape`` that keep the axes up to the sliced one, ``transpose``,
  ``permute``, ``unsqueeze``;
- attention's query rows: ``sdpa(q[rows], k, v)`` (its mask sliced alike).
  Keys and values stay whole. A causal attention is crossed only when the
  kept rows start at 0 (its mask is aligned to the top-left corner).

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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir import Graph
from .base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten

_SLICE = aten.slice.Tensor
_SAME_SHAPE = {aten.clone.default, aten._to_copy.default, aten.alias.default, aten.to.dtype,
               aten.dropout.default, aten.contiguous.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_ROW_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int}


@dataclass(frozen=True)
class Rows:
    """Rows ``start:end`` (step 1, within bounds, not all of them) of axis ``dim``."""

    dim: int
    start: int
    end: int


@dataclass
class Narrowed:
    """How to compute an op on some rows: which tensor arguments to slice (key: position
    or keyword) on which axis, and a rewrite of its other arguments (a view's shape)."""

    inputs: dict[int | str, int]
    fix_args: Callable[[tuple, int], tuple] | None = None


@register_pass
class PruneRows(Pass):
    name = "prune_rows"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        g = graph.fx
        seeds = _slice_selects(g)
        narrowed = 0
        erased: set[fx.Node] = set()
        changed = True
        while changed:
            changed = False
            for node in list(g.nodes):
                if node in erased or node.target is not _SLICE:
                    continue  # erased earlier in this sweep, or not a slice
                rows = _rows_of(node)
                source = node.args[0]
                if rows is None or not isinstance(source, fx.Node) or source.op != "call_function":
                    continue
                if not all(u.target is _SLICE and _rows_of(u) == rows and u.args[0] is source
                           for u in source.users):
                    continue  # something else reads the value whole
                plan = _plan(source, rows)
                if plan is None:
                    continue
                erased |= _narrow(g, source, rows, plan)
                narrowed += 1
                changed = True
        # A select whose slice moved nowhere goes back to what it was.
        for select, rows, (x, dim, index) in seeds:
            if rows not in erased:
                select.args = (x, dim, index)
                g.erase_node(rows)
        return PassResult(narrowed > 0, {"ops_narrowed": narrowed})


# ---- finding slices ----------------------------------------------------------------


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _static(val: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in val.shape)


def _slice_selects(g: fx.Graph) -> list[tuple[fx.Node, fx.Node, tuple]]:
    """Rewrite each ``select(x, d, i)`` of an op's output as ``select(slice(x, d, i, i + 1), d, 0)``.

    Returns (select, its new slice, its old arguments) per rewrite.
    """
    seeds = []
    for node in list(g.nodes):
        if node.target is not aten.select.int:
            continue
        x, dim, index = node.args
        val = _val(x)
        if val is None or not _static(val) or x.op != "call_function" or val.shape[dim] == 1:
            continue
        dim %= val.dim()
        index %= val.shape[dim]
        with g.inserting_before(node):
            rows = g.call_function(_SLICE, (x, dim, index, index + 1))
        rows.meta["val"] = val.narrow(dim, index, 1)
        seeds.append((node, rows, node.args))
        node.args = (rows, dim, 0)
    return seeds


def _rows_of(node: fx.Node) -> Rows | None:
    """The rows a ``slice.Tensor`` node keeps, or None when it is not a narrowing worth moving."""
    val = _val(node.args[0])
    if val is None or not _static(val):
        return None
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
    dim, start, end, step = (node.kwargs.get(k, a) for k, a in zip(("dim", "start", "end", "step"), args[1:5]))
    if step != 1:
        return None
    dim %= val.dim()
    size = val.shape[dim]
    start = 0 if start is None else max(start + size if start < 0 else start, 0)
    end = size if end is None else min(end + size if end < 0 else end, size)
    if start >= end or (start, end) == (0, size):
        return None
    return Rows(dim, start, end)


# ---- which inputs to slice, per op -------------------------------------------------


def _tensor_args(node: fx.Node):
    for key, a in [*enumerate(node.args), *node.kwargs.items()]:
        if _val(a) is not None:
            yield key, a


def _plan(node: fx.Node, rows: Rows) -> Narrowed | None:
    """How ``node`` computes only ``rows`` of its output, or None when it cannot."""
    out = _val(node)
    if out is None or not _static(out):
        return None
    d, t, args = rows.dim, node.target, node.args
    if t in _SAME_SHAPE:
        return Narrowed({0: d})
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
        inputs = {}
        for key, a in _tensor_args(node):
            val = _val(a)
            axis = d - (out.dim() - val.dim())  # broadcasting aligns shapes on the right
            if axis >= 0 and val.shape[axis] != 1:
                inputs[key] = axis
        return Narrowed(inputs)
    if t is aten.layer_norm.default:
        return Narrowed({0: d}) if d < out.dim() - len(args[1]) else None
    if t in _SOFTMAX:
        return Narrowed({0: d}) if args[1] % out.dim() != d else None
    if t in _ROW_REDUCTIONS:
        return _reduction(node, d)
    if t is aten.linear.default:
        return Narrowed({0: d}) if d < out.dim() - 1 else None
    if t is aten.addmm.default:
        bias = _val(args[0])
        return Narrowed({1: 0, **({0: 0} if bias.dim() == 2 and bias.shape[0] != 1 else {})}) if d == 0 else None
    if t is aten.mm.default:
        return Narrowed({0: 0}) if d == 0 else None
    if t in (aten.matmul.default, aten.bmm.default):
        a = _val(args[0])
        return Narrowed({0: a.dim() - 2}) if a.dim() >= 2 and d == out.dim() - 2 else None
    if t is aten.embedding.default:
        return Narrowed({1: d}) if d < _val(args[1]).dim() else None
    if t in _VIEWS:
        return _view(node, rows)
    if t is aten.transpose.int:
        a, b = (x % out.dim() for x in args[1:3])
        return Narrowed({0: b if d == a else a if d == b else d})
    if t is aten.permute.default:
        return Narrowed({0: args[1][d] % out.dim()})
    if t is aten.unsqueeze.default:
        k = args[1] % out.dim()
        return None if d == k else Narrowed({0: d if d < k else d - 1})
    if t is aten.scaled_dot_product_attention.default:
        return _attention(node, rows)
    return None


def _reduction(node: fx.Node, d: int) -> Narrowed | None:
    x = _val(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not dims:
        return None  # a reduction over everything
    reduced = {r % x.dim() for r in dims}
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    kept = list(range(x.dim())) if keepdim else [i for i in range(x.dim()) if i not in reduced]
    axis = kept[d]
    return None if axis in reduced else Narrowed({0: axis})


def _view(node: fx.Node, rows: Rows) -> Narrowed | None:
    # Only views that leave every axis up to the sliced one as it is: the axes after
    # it are merged or split within each row, which stays valid on a row slice.
    x, out = _val(node.args[0]), _val(node)
    d = rows.dim
    if x.dim() <= d or tuple(x.shape[:d + 1]) != tuple(out.shape[:d + 1]):
        return None
    shape = list(out.shape)

    def fix(args: tuple, count: int) -> tuple:
        return (args[0], [count if i == d else s for i, s in enumerate(shape)], *args[2:])
    return Narrowed({0: d}, fix)


def _attention(node: fx.Node, rows: Rows) -> Narrowed | None:
    out, q = _val(node), _val(node.args[0])
    if rows.dim != out.dim() - 2:
        return None  # batch or head axes: keys and values would need the same slice
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    given = {**dict(zip(names, node.args)), **node.kwargs}
    if given.get("is_causal") and rows.start != 0:
        return None  # the causal mask is aligned to the top-left: row r of a slice is not row r
    inputs: dict[int | str, int] = {0: q.dim() - 2}
    mask = given.get("attn_mask")
    if _val(mask) is not None and _val(mask).dim() >= 2 and _val(mask).shape[-2] != 1:
        key = 3 if len(node.args) > 3 else "attn_mask"
        inputs[key] = _val(mask).dim() - 2
    return Narrowed(inputs)


# ---- the rewrite -------------------------------------------------------------------


def _narrow(g: fx.Graph, source: fx.Node, rows: Rows, plan: Narrowed) -> set[fx.Node]:
    """Replace every (identical) slice of ``source`` by ``source`` computed on the slices of its inputs.

    Returns the nodes it erased: the slices and ``source``.
    """
    count = rows.end - rows.start
    args, kwargs = list(source.args), dict(source.kwargs)
    with g.inserting_before(source):
        for key, axis in plan.inputs.items():
            arg = args[key] if isinstance(key, int) else kwargs[key]
            sliced = g.call_function(_SLICE, (arg, axis, rows.start, rows.end))
            sliced.meta["val"] = _val(arg).narrow(axis, rows.start, count)
            if isinstance(key, int):
                args[key] = sliced
            else:
                kwargs[key] = sliced
        new_args = plan.fix_args(tuple(args), count) if plan.fix_args else tuple(args)
        narrowed = g.call_function(source.target, new_args, kwargs)
    narrowed.meta["val"] = _val(source).narrow(rows.dim, rows.start, count)
    erased = set(source.users)
    for user in erased:
        user.replace_all_uses_with(narrowed)
        g.erase_node(user)
    g.erase_node(source)
    return erased | {source}
