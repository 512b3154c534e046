"""Convert an FX partition (ATen ops, static shapes) into a Relax function.

Walks the graph once with TVM's own PyTorch converters (the op table of
``tvm.relax.frontend.torch``), so no re-export is needed, and adds what kiln
relies on that the frontend lacks or gets wrong:

- nodes in the dispatch plan become ``R.call_dps_packed("kiln.<op>", ...)``;
- subgraphs that read no input (position ids, causal masks) are evaluated
  once with PyTorch and embedded as constants, so eager decides their exact
  values and none of their bool/int64 ops reach TVM's converters;
- ``exp``, ``sigmoid``, ``silu``, ``tanh``, ``erf``, ``gelu`` use TVM's fast
  polynomial versions (see ``_fast``), so they vectorize and fuse;
- ``pow(x, 2|3)`` becomes products, as in PyTorch (TIR's pow is scalar libm);
- ``cumsum`` of a bool tensor is cast to its int64 result type first (LLVM
  codegen fails on a bool scan); ``cat`` drops empty inputs (Relax rejects
  them); ``diff`` and ``_unsafe_view`` get converters; ``select`` is a slice
  (the frontend's unchecked ``take`` read out of bounds for a negative index);
  ``clamp`` with one bound on an integer tensor takes the dtype's limit for
  the other (the frontend's infinity does not convert to an integer);
- an in-place op (``add_``, ``index_put_``, ``copy_``) rebinds the tensor it
  mutates, because the frontend returns a new value and later readers of the
  old one would silently see stale data; mutating an input or a view (which
  would need aliasing) is refused;
- every converted value is checked against the node's ``meta["val"]``: a
  dtype the frontend changed (e.g. bool ``&`` done in int64) is cast back,
  and a shape that differs is an error, never a silent wrong answer.

Relies on the importer's ``convert_map``/``env``/``block_builder`` attributes,
which are not public API; TVM is pinned, and the tests exercise each path.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
import tvm
from tvm import relax, topi
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from ...errors import UnsupportedOpError
from .dispatch import BSHD_OUTPUT, Args, DispatchRule, heads_last_source, specialize

aten = torch.ops.aten

# Ops that only assert or describe; they produce no value kiln needs.
_NO_VALUE = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}

# A folded constant is embedded in the library, so keep it from ballooning.
_FOLD_MAX_ELEMENTS = 1 << 22


class _Bridge:
    def __init__(self, gm: fx.GraphModule, plan: dict[fx.Node, tuple[DispatchRule, Args]],
                 weights: dict[str, torch.Tensor] | None = None):
        self.gm = gm
        self.plan = plan
        self.weights = weights or {}
        self.imp = ExportedProgramImporter()
        self.bb = relax.BlockBuilder()
        self.imp.block_builder = self.bb
        self.env = self.imp.env
        self.report: list[dict] = []
        self._heads_last: dict[fx.Node, relax.Var] = {}  # attention node -> its output as [B, S, H, D]
        self._own = {
            aten.cumsum.default: self._cumsum,
            aten.cat.default: self._cat,
            aten.diff.default: self._diff,
            aten._unsafe_view.default: self._reshape_to_meta,
            aten.select.int: self._select,
            aten.clamp.default: self._clamp,
            aten.pow.Tensor_Scalar: self._pow,
            aten.exp.default: self._fast(lambda x: topi.fast_exp(x)),
            aten.sigmoid.default: self._fast(lambda x: 1 / (1 + topi.fast_exp(-x))),
            aten.silu.default: self._fast(lambda x: x / (1 + topi.fast_exp(-x))),
            aten.tanh.default: self._fast(lambda x: topi.fast_tanh(x)),
            aten.erf.default: self._fast(lambda x: topi.fast_erf(x)),
            aten.gelu.default: self._gelu,
        }

    # -- entry ---------------------------------------------------------------------------------
    def convert(self, name: str) -> tvm.IRModule:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        params = [relax.Var(n.name, self._type(n.meta["val"])) for n in placeholders]
        constants = self._fold_input_free()
        # What dispatch specialization may look at: folded values and the weights (kiln's
        # fold_constants pass turns input-free subgraphs, e.g. ViT's all-True mask, into weights).
        self.known = {**{n: self.weights[n.name] for n in placeholders if n.name in self.weights}, **constants}
        with self.bb.function(name=name, params=params):
            with self.bb.dataflow():
                for node, var in zip(placeholders, params):
                    self.env[node] = var
                for node in self.gm.graph.nodes:
                    if node.op == "call_function":
                        self._call(node, constants)
                    elif node.op == "output":
                        outs = [self.env[o] for o in node.args[0]]
                        out = self.bb.emit_output(relax.Tuple(outs))
            self.bb.emit_func_output(out)
        return self.bb.get()

    def _call(self, node: fx.Node, constants: dict[fx.Node, torch.Tensor]) -> None:
        if node.target in _NO_VALUE:
            return
        if node in constants:
            if any(u not in constants for u in node.users):  # skip values only other constants read
                self.env[node] = relax.const(constants[node].numpy())
            self._note(node, "constant")
            return
        if node in self.plan:
            rule, args = specialize(*self.plan[node], self.known)
            self.env[node] = self._emit_dispatch(node, rule, args)
            self._note(node, "dispatch", function=rule.function, rule=rule.name)
            return
        merged = self._merged_heads(node)
        if merged is not None:
            self.env[node] = merged
            self._note(node, "view", of=self._heads_last_of(node).name)
            return
        schema = getattr(node.target, "_schema", None)
        value = self._convert(node)
        if schema is not None and schema.is_mutable:
            self._rebind_mutated(node, value)
        self.env[node] = self._check(node, value)
        self._note(node, "tir")

    def _convert(self, node: fx.Node):
        own = self._own.get(node.target)
        if own is not None:
            return own(node)
        key = "getitem" if node.target is operator.getitem else getattr(node.target, "__name__", None)
        converter = self.imp.convert_map.get(key)
        if converter is None:
            raise UnsupportedOpError(f"node {node.name}: op {node.target} has no TVM Relax converter; "
                                     "place it on another backend")
        try:
            return converter(node)
        except UnsupportedOpError:
            raise
        except Exception as e:
            raise UnsupportedOpError(f"node {node.name}: TVM could not convert {node.target}: "
                                     f"{type(e).__name__}: {e}") from e

    # -- folding -------------------------------------------------------------------------------
    def _fold_input_free(self) -> dict[fx.Node, torch.Tensor]:
        """Evaluate with PyTorch every node that reads no placeholder, directly or not."""
        values: dict[fx.Node, torch.Tensor] = {}
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node in self.plan or node.target in _NO_VALUE:
                continue
            schema = getattr(node.target, "_schema", None)
            if schema is None or schema.is_mutable:
                continue
            if "nondeterministic_seeded" in getattr(node.target, "tags", ()):
                continue
            inputs = node.all_input_nodes
            if not all(i in values for i in inputs):
                continue
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.numel() > _FOLD_MAX_ELEMENTS:
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            values[node] = node.target(*args, **kwargs).contiguous()
        return values

    # -- library dispatch ----------------------------------------------------------------------
    def _emit_dispatch(self, node: fx.Node, rule: DispatchRule, args: Args) -> relax.Var:
        relax_args = []
        for a in args:
            if isinstance(a, fx.Node):
                relax_args.append(self.env[a])
            elif isinstance(a, float):
                relax_args.append(relax.prim_value(tvm.tirx.FloatImm("float64", a)))
            else:
                relax_args.append(relax.prim_value(int(a)))
        out_type = self._type(node.meta["val"])
        if rule.name in BSHD_OUTPUT:
            b, h, s, d = node.meta["val"].shape
            out_type = relax.TensorType([b, s, h, d], self._dtype(node.meta["val"].dtype))
        if rule.returns:
            raw = self.bb.emit(relax.op.call_pure_packed(rule.function, *relax_args, ty_args=out_type))
        else:
            raw = self.bb.emit(relax.call_dps_packed(rule.function, relax_args, out_type))
        if rule.name not in BSHD_OUTPUT:
            return raw
        # The library gives [B, S, H, D]; the node's [B, H, S, D] value is a transpose of it that
        # DeadCodeElimination drops when, as usual, only the head-merging transpose reads it.
        self._heads_last[node] = raw
        return self.bb.emit(relax.op.permute_dims(raw, [0, 2, 1, 3]))

    def _heads_last_of(self, node: fx.Node) -> fx.Node | None:
        """The attention node whose [B, S, H, D] output ``node`` (``y.transpose(1, 2)``) equals, if any."""
        src = heads_last_source(node)
        # Look through views that keep the shape (HF's ``attn_output.view(B, H, S, D)``).
        while (src is not None and src not in self._heads_last and src.op == "call_function"
               and src.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
               and isinstance(src.args[0], fx.Node) and src.args[0].meta["val"].shape == src.meta["val"].shape):
            src = src.args[0]
        return src if src in self._heads_last else None

    def _merged_heads(self, node: fx.Node) -> relax.Var | None:
        attention = self._heads_last_of(node)
        return None if attention is None else self._heads_last[attention]

    # -- converters for what the frontend lacks --------------------------------------------------
    def _cumsum(self, node: fx.Node) -> relax.Var:
        x = self.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        out_dtype = self._dtype(node.meta["val"].dtype)
        if x.ty.dtype != out_dtype:
            # torch sums bools (and small ints) in int64; LLVM cannot scan a bool buffer.
            x = self.bb.emit(relax.op.astype(x, out_dtype))
        return self.bb.emit(relax.op.cumsum(x, dim))

    def _cat(self, node: fx.Node) -> relax.Var:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [t for t in node.args[0] if t.meta["val"].numel() > 0]
        if not parts:
            return self.bb.emit(relax.op.zeros(list(node.meta["val"].shape), self._dtype(node.meta["val"].dtype)))
        if len(parts) == 1:
            return self.env[parts[0]]
        return self.bb.emit(relax.op.concat([self.env[t] for t in parts], axis=dim))

    def _select(self, node: fx.Node) -> relax.Var:
        # TVM's converter emits take(x, index) in its unchecked "fast" mode: a negative index
        # (x[:, -1]: the last token) read out of bounds, silently wrong. A slice is exact.
        x, dim, index = node.args[:3]
        shape = x.meta["val"].shape
        dim %= len(shape)
        i = index + shape[dim] if index < 0 else index
        if not 0 <= i < shape[dim]:
            raise UnsupportedOpError(f"node {node.name}: index {index} is out of range for dimension {dim} "
                                     f"of size {shape[dim]}")
        sliced = relax.op.strided_slice(self.env[x], [dim], [i], [i + 1])
        return self.bb.emit(relax.op.squeeze(sliced, [dim]))

    def _clamp(self, node: fx.Node) -> relax.Var:
        # The frontend fills a missing bound with +-inf, which cannot be cast to an integer
        # dtype ("Cannot convert infinity to BigInt"): positions.clamp(min=0) failed to compile.
        names = ("input", "min", "max")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        dtype = node.meta["val"].dtype
        if dtype.is_floating_point:
            lo, hi = -float("inf"), float("inf")
        else:
            lo, hi = torch.iinfo(dtype).min, torch.iinfo(dtype).max
        lo = lo if given.get("min") is None else given["min"]
        hi = hi if given.get("max") is None else given["max"]
        return self.bb.emit(relax.op.clip(self.env[given["input"]], lo, hi))

    def _diff(self, node: fx.Node) -> relax.Var:
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("n", 1)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        prepend = node.args[3] if len(node.args) > 3 else node.kwargs.get("prepend")
        append = node.args[4] if len(node.args) > 4 else node.kwargs.get("append")
        parts = [p for p in (prepend, node.args[0], append) if p is not None]
        x = self.env[parts[0]] if len(parts) == 1 else self.bb.emit(
            relax.op.concat([self.env[p] for p in parts], axis=dim))
        for _ in range(n):
            length = int(x.ty.shape[dim])
            hi = relax.op.strided_slice(x, [dim], [1], [length])
            lo = relax.op.strided_slice(x, [dim], [0], [length - 1])
            x = self.bb.emit(relax.op.subtract(hi, lo))
        return x

    def _fast(self, compute):
        """A float32 transcendental through TVM's vectorizable polynomial (``topi.fast_*``).

        TIR's ``exp``/``tanh``/``erf`` become scalar libm calls (silu alone took
        1.2 ms on 128x2048 here, tanh 1.5 ms, erf 4.7 ms); ``fast_exp``/``fast_tanh``/
        ``fast_erf`` vectorize (0.1-0.17 ms, faster than PyTorch's 0.14-0.57 ms)
        and stay within 4e-7 of PyTorch, inside fp32 ``assert_close`` tolerances.
        """
        def convert(node: fx.Node) -> relax.Var:
            if node.meta["val"].dtype != torch.float32:
                return self.imp.convert_map[node.target.__name__](node)
            return self.bb.emit_te(compute, self.env[node.args[0]],
                                   primfunc_name_hint=node.target.__name__.split(".")[0])
        return convert

    def _gelu(self, node: fx.Node) -> relax.Var:
        tanh = node.kwargs.get("approximate", "none") == "tanh"
        if tanh:
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as PyTorch's approximate="tanh"
            def gelu(x):
                return 0.5 * x * (1 + topi.fast_tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
        else:
            def gelu(x):
                return 0.5 * x * (1 + topi.fast_erf(x * 0.7071067811865476))
        return self._fast(gelu)(node)

    def _pow(self, node: fx.Node) -> relax.Var:
        x, exponent = self.env[node.args[0]], node.args[1]
        if exponent in (2, 3) and node.meta["val"].dtype.is_floating_point:
            # PyTorch computes these as products too; TIR's pow is a scalar libm call.
            sq = relax.op.multiply(x, x)
            return self.bb.emit(sq if exponent == 2 else relax.op.multiply(sq, x))
        return self.imp.convert_map["pow.Tensor_Scalar"](node)

    def _reshape_to_meta(self, node: fx.Node) -> relax.Var:
        return self.bb.emit(relax.op.reshape(self.env[node.args[0]], list(node.meta["val"].shape)))

    # -- in-place ops and checks ---------------------------------------------------------------
    def _rebind_mutated(self, node: fx.Node, value) -> None:
        schema = node.target._schema
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            target = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if not isinstance(target, fx.Node):
                continue
            if target.op == "placeholder":
                raise UnsupportedOpError(f"node {node.name}: {node.target} writes to input {target.name}; "
                                         "kiln lowers pure functions (the caller would not see the update)")
            if getattr(target.target, "is_view", False):
                raise UnsupportedOpError(f"node {node.name}: {node.target} writes through view {target.name}; "
                                         "the tensor it aliases would not see the update")
            self.env[target] = self._check(node, value)

    def _check(self, node: fx.Node, value):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, relax.Expr):
            return value
        ty = value.ty
        if not isinstance(ty, relax.TensorType):
            return value
        if [int(s) for s in ty.shape] != list(val.shape):
            raise UnsupportedOpError(f"node {node.name}: TVM's converter for {node.target} gives shape "
                                     f"{[int(s) for s in ty.shape]}, PyTorch {list(val.shape)}")
        want = self._dtype(val.dtype)
        if ty.dtype != want:
            value = self.bb.emit(relax.op.astype(value, want))
        return value

    def _note(self, node: fx.Node, how: str, **extra) -> None:
        self.report.append({"node": node.name, "op": str(node.target), "how": how, **extra})

    def _type(self, val: torch.Tensor) -> relax.TensorType:
        return relax.TensorType(list(val.shape), self._dtype(val.dtype))

    def _dtype(self, dtype: torch.dtype) -> str:
        return self.imp._convert_data_type(dtype)


@functools.cache
def _op_table() -> tuple[frozenset, frozenset]:
    """The ops kiln converts itself, and the names TVM's frontend has converters for."""
    bridge = _Bridge(fx.GraphModule(torch.nn.Module(), fx.Graph()), {})
    return frozenset(bridge._own), frozenset(bridge.imp.convert_map)


def convertible(node: fx.Node) -> bool:
    """Whether ``to_relax`` has a converter for this ``call_function`` node's op (the backend's op table)."""
    own, frontend = _op_table()
    target = node.target
    return (target in _NO_VALUE or target in own or target is operator.getitem
            or getattr(target, "__name__", None) in frontend)


def to_relax(gm: fx.GraphModule, plan: dict[fx.Node, tuple[DispatchRule, Args]],
             name: str = "main", weights: dict[str, torch.Tensor] | None = None) -> tuple[tvm.IRModule, list[dict]]:
    """The Relax module for ``gm`` (one function ``name``, params = placeholders) and a per-node report.

    ``weights`` (by placeholder name) are read only to specialize dispatch calls (an all-True mask is dropped).
    """
    bridge = _Bridge(gm, plan, weights)
    return bridge.convert(name), bridge.report
