"""Row-slicing rules: how an op computes only some rows of its output from slices of its inputs.

``slice(f(x), dim, a, b)`` equals ``f(slice(x, dim', a, b))`` for the ops
below, where ``dim'`` is the axis of ``x`` that becomes ``dim`` of the output.
Each rule of :data:`ROW_RULES` is a named ``(pattern, handler)`` pair: the
pattern says which nodes it covers, the handler returns a :class:`Narrowed`
plan (which tensor arguments to slice, on which axis, and a rewrite of the
other arguments) or None when the op mixes the rows asked for. The rule's
name travels in the plan, so a pass can log and count which rules fired.
``prune_rows`` moves output slices up through them; chunked prefill and
micro-batching reuse the same table. The rules:

- ``same_shape``: clones, casts, dropout (eval), ``contiguous``;
- ``pointwise`` (``torch.Tag.pointwise``: activations, arithmetic with
  broadcasting): an operand broadcast along the axis is left whole;
- ``layer_norm`` over trailing axes, ``softmax`` over another axis,
  ``row_reduction`` (``mean``/``sum``/``amax``/``amin`` over other axes:
  RMS norm);
- GEMMs on their row axis: ``linear``, ``addmm``, ``mm``, ``matmul``
  (``matmul`` and ``bmm``); ``embedding`` lookups;
- ``view`` / ``reshape`` that keep the axes up to the sliced one,
  ``transpose``, ``permute``, ``unsqueeze``;
- ``attention_queries``: ``sdpa(q[rows], k, v)`` (its mask sliced alike) on
  the query axis; keys and values stay whole. A causal attention is crossed
  only when the kept rows start at 0 (its mask is aligned to the top-left).

Static shapes only: a node whose shape is symbolic matches no rule.
:func:`narrow` applies a plan with :mod:`kiln.ir.rewrite`, so the narrowed
node and the slices of its inputs keep the module stack, layer, role and
placement of the node they replace.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from .rewrite import insert_node, node_arg

aten = torch.ops.aten

SLICE = aten.slice.Tensor
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
    or keyword) on which axis, and a rewrite of its other arguments (a view's shape).
    ``rule`` is the name of the :class:`RowRule` that made the plan."""

    inputs: dict[int | str, int]
    fix_args: Callable[[tuple, int], tuple] | None = None
    rule: str = ""


@dataclass(frozen=True)
class RowRule:
    """A named rule: ``pattern(node)`` says whether it applies, ``handler(node, rows)`` plans it."""

    name: str
    pattern: Callable[[fx.Node], bool]
    handler: Callable[[fx.Node, Rows], Narrowed | None]


def val(node) -> torch.Tensor | None:
    """A node's fake tensor value, or None (not a node, or not a tensor)."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def static(v: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in v.shape)


def rows_of(node: fx.Node) -> Rows | None:
    """The rows a ``slice.Tensor`` node keeps, or None when it is not a narrowing worth moving."""
    v = val(node.args[0])
    if v is None or not static(v):
        return None
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
    dim, start, end, step = (node.kwargs.get(k, a) for k, a in zip(("dim", "start", "end", "step"), args[1:5]))
    if step != 1:
        return None
    dim %= v.dim()
    size = v.shape[dim]
    start = 0 if start is None else max(start + size if start < 0 else start, 0)
    end = size if end is None else min(end + size if end < 0 else end, size)
    if start >= end or (start, end) == (0, size):
        return None
    return Rows(dim, start, end)


# ---- the handlers ------------------------------------------------------------------


def _tensor_args(node: fx.Node):
    for key, a in [*enumerate(node.args), *node.kwargs.items()]:
        if val(a) is not None:
            yield key, a


def _same_shape(node: fx.Node, rows: Rows) -> Narrowed:
    return Narrowed({0: rows.dim})


def _pointwise(node: fx.Node, rows: Rows) -> Narrowed:
    out, inputs = val(node), {}
    for key, a in _tensor_args(node):
        v = val(a)
        axis = rows.dim - (out.dim() - v.dim())  # broadcasting aligns shapes on the right
        if axis >= 0 and v.shape[axis] != 1:
            inputs[key] = axis
    return Narrowed(inputs)


def _layer_norm(node: fx.Node, rows: Rows) -> Narrowed | None:
    return Narrowed({0: rows.dim}) if rows.dim < val(node).dim() - len(node.args[1]) else None


def _softmax(node: fx.Node, rows: Rows) -> Narrowed | None:
    return Narrowed({0: rows.dim}) if node.args[1] % val(node).dim() != rows.dim else None


def _reduction(node: fx.Node, rows: Rows) -> Narrowed | None:
    x = val(node.args[0])
    dims = node_arg(node, 1, "dim")
    if not dims:
        return None  # a reduction over everything
    reduced = {r % x.dim() for r in dims}
    keepdim = node_arg(node, 2, "keepdim", False)
    kept = list(range(x.dim())) if keepdim else [i for i in range(x.dim()) if i not in reduced]
    axis = kept[rows.dim]
    return None if axis in reduced else Narrowed({0: axis})


def _linear(node: fx.Node, rows: Rows) -> Narrowed | None:
    return Narrowed({0: rows.dim}) if rows.dim < val(node).dim() - 1 else None


def _addmm(node: fx.Node, rows: Rows) -> Narrowed | None:
    if rows.dim != 0:
        return None
    bias = val(node.args[0])
    return Narrowed({1: 0, **({0: 0} if bias.dim() == 2 and bias.shape[0] != 1 else {})})


def _mm(node: fx.Node, rows: Rows) -> Narrowed | None:
    return Narrowed({0: 0}) if rows.dim == 0 else None


def _matmul(node: fx.Node, rows: Rows) -> Narrowed | None:
    a = val(node.args[0])
    return Narrowed({0: a.dim() - 2}) if a.dim() >= 2 and rows.dim == val(node).dim() - 2 else None


def _embedding(node: fx.Node, rows: Rows) -> Narrowed | None:
    return Narrowed({1: rows.dim}) if rows.dim < val(node.args[1]).dim() else None


def _view(node: fx.Node, rows: Rows) -> Narrowed | None:
    # Only views that leave every axis up to the sliced one as it is: the axes after
    # it are merged or split within each row, which stays valid on a row slice.
    x, out = val(node.args[0]), val(node)
    d = rows.dim
    if x.dim() <= d or tuple(x.shape[:d + 1]) != tuple(out.shape[:d + 1]):
        return None
    shape = list(out.shape)

    def fix(args: tuple, count: int) -> tuple:
        return (args[0], [count if i == d else s for i, s in enumerate(shape)], *args[2:])
    return Narrowed({0: d}, fix)


def _transpose(node: fx.Node, rows: Rows) -> Narrowed:
    d = rows.dim
    a, b = (x % val(node).dim() for x in node.args[1:3])
    return Narrowed({0: b if d == a else a if d == b else d})


def _permute(node: fx.Node, rows: Rows) -> Narrowed:
    return Narrowed({0: node.args[1][rows.dim] % val(node).dim()})


def _unsqueeze(node: fx.Node, rows: Rows) -> Narrowed | None:
    d, k = rows.dim, node.args[1] % val(node).dim()
    return None if d == k else Narrowed({0: d if d < k else d - 1})


def _attention(node: fx.Node, rows: Rows) -> Narrowed | None:
    out, q = val(node), val(node.args[0])
    if rows.dim != out.dim() - 2:
        return None  # batch or head axes: keys and values would need the same slice
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    given = {**dict(zip(names, node.args)), **node.kwargs}
    if given.get("is_causal") and rows.start != 0:
        return None  # the causal mask is aligned to the top-left: row r of a slice is not row r
    inputs: dict[int | str, int] = {0: q.dim() - 2}
    mask = val(given.get("attn_mask"))
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
        inputs[3 if len(node.args) > 3 else "attn_mask"] = mask.dim() - 2
    return Narrowed(inputs)


def _targets(*targets) -> Callable[[fx.Node], bool]:
    wanted = frozenset(t for group in targets for t in (group if isinstance(group, (set, frozenset)) else {group}))
    return lambda node: node.target in wanted


def _is_pointwise(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


# In order: the first rule whose pattern matches a node decides for it.
ROW_RULES: tuple[RowRule, ...] = (
    RowRule("same_shape", _targets(_SAME_SHAPE), _same_shape),
    RowRule("pointwise", _is_pointwise, _pointwise),
    RowRule("layer_norm", _targets(aten.layer_norm.default), _layer_norm),
    RowRule("softmax", _targets(_SOFTMAX), _softmax),
    RowRule("row_reduction", _targets(_ROW_REDUCTIONS), _reduction),
    RowRule("linear", _targets(aten.linear.default), _linear),
    RowRule("addmm", _targets(aten.addmm.default), _addmm),
    RowRule("mm", _targets(aten.mm.default), _mm),
    RowRule("matmul", _targets(aten.matmul.default, aten.bmm.default), _matmul),
    RowRule("embedding", _targets(aten.embedding.default), _embedding),
    RowRule("view", _targets(_VIEWS), _view),
    RowRule("transpose", _targets(aten.transpose.int), _transpose),
    RowRule("permute", _targets(aten.permute.default), _permute),
    RowRule("unsqueeze", _targets(aten.unsqueeze.default), _unsqueeze),
    RowRule("attention_queries", _targets(aten.scaled_dot_product_attention.default), _attention),
)


def plan_rows(node: fx.Node, rows: Rows, rules: tuple[RowRule, ...] = ROW_RULES) -> Narrowed | None:
    """How ``node`` computes only ``rows`` of its output (the plan names its rule), or None when it cannot."""
    out = val(node)
    if out is None or not static(out):
        return None
    rule = next((r for r in rules if r.pattern(node)), None)
    if rule is None:
        return None
    plan = rule.handler(node, rows)
    if plan is not None:
        plan.rule = rule.name
    return plan


# ---- the rewrite -------------------------------------------------------------------


def narrow(g: fx.Graph, source: fx.Node, rows: Rows, plan: Narrowed) -> set[fx.Node]:
    """Replace every (identical) slice of ``source`` by ``source`` computed on the slices of its inputs.

    The slices of the inputs and the narrowed node carry ``source``'s
    metadata (the narrowed node as its replacement). Returns the nodes it
    erased: the slices and ``source``.
    """
    count = rows.end - rows.start
    args, kwargs = list(source.args), dict(source.kwargs)
    for key, axis in plan.inputs.items():
        arg = args[key] if isinstance(key, int) else kwargs[key]
        sliced = insert_node(g, SLICE, (arg, axis, rows.start, rows.end), origin=source,
                             val=val(arg).narrow(axis, rows.start, count))
        if isinstance(key, int):
            args[key] = sliced
        else:
            kwargs[key] = sliced
    new_args = plan.fix_args(tuple(args), count) if plan.fix_args else tuple(args)
    narrowed = insert_node(g, source.target, new_args, kwargs, origin=source, replaces=True,
                           val=val(source).narrow(rows.dim, rows.start, count))
    erased = set(source.users)
    for user in erased:
        user.replace_all_uses_with(narrowed)
        g.erase_node(user)
    g.erase_node(source)
    return erased | {source}
