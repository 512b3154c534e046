"""Convert an FX partition (ATen ops, static shapes) into a Relax function.

Walks the graph once with TVM's own PyTorch converters (the op table of
``tvm.relax.frontend.torch``), so no re-export is needed, and adds what kiln
relies on that the frontend lacks or gets wrong:

- nodes in the target's dispatch plan become ``R.call_dps_packed("kiln.<op>", ...)``;
- subgraphs that read no input (position ids, causal masks) are evaluated
  once with PyTorch and embedded as constants, so eager decides their exact
  values and none of their bool/int64 ops reach TVM's converters;
- ``exp``, ``sigmoid``, ``silu``, ``tanh``, ``erf``, ``gelu`` use TVM's fast
  polynomial versions (see ``_fast``), so they vectorize and fuse;
- ``pow(x, 2|3)`` becomes products, as in PyTorch (TIR's pow is scalar libm);
- bf16 and fp16 compute in fp32 (``_in_fp32``), and a step function of a fused
  bf16 chain (a cast to an integer, ``floor``, a comparison) and every node it is
  computed from read their bf16 inputs rounded by bits (``_exact_readers``):
  TVM rounds a fused kernel's bf16 only where it stores;
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
import math
import operator

import torch
import torch.fx as fx
import tvm
from tvm import relax, topi
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from ...errors import UnsupportedOpError
from ...ir.rewrite import node_arg
from .dispatch import Args, DispatchRule, LibraryDispatch, Plan, absorbed, heads_last_source
from .finite import emit_nonfinite_flag

aten = torch.ops.aten

# Ops that only assert or describe; they produce no value kiln needs.
_NO_VALUE = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}

# A folded constant is embedded in the library, so keep it from ballooning.
_FOLD_MAX_ELEMENTS = 1 << 22


class _Bridge:
    def __init__(self, gm: fx.GraphModule, dispatch: LibraryDispatch, plan: Plan,
                 weights: dict[str, torch.Tensor] | None = None, converters: dict | None = None):
        self.gm = gm
        self.converters = converters or {}
        self.dispatch = dispatch
        self.plan = plan
        self._absorbed = absorbed(plan)  # nodes computed inside a dispatched node's call
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
            aten.relu.default: self._relu,
            aten.hardtanh.default: self._hardtanh,
            aten.clamp_min.default: lambda n: self._clamp_to(n, n.args[1], None),
            aten.clamp_max.default: lambda n: self._clamp_to(n, None, n.args[1]),
            aten.maximum.default: lambda n: self._extremum(n, relax.op.maximum),
            aten.minimum.default: lambda n: self._extremum(n, relax.op.minimum),
            aten.layer_norm.default: self._layer_norm,
            aten.div.Tensor_mode: self._div_mode,
            aten.eq.Tensor: self._self_comparison,
            aten.ne.Tensor: self._not_equal,
            aten.ne.Scalar: self._not_equal,
            aten.clamp.Tensor: self._clamp_tensor,
            aten.var.dim: self._variance,
            aten.var.correction: self._variance,
            aten.std.dim: self._variance,
            aten.std.correction: self._variance,
        }

    # -- entry ---------------------------------------------------------------------------------
    def convert(self, name: str) -> tvm.IRModule:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        params = [relax.Var(n.name, self._type(n.meta["val"])) for n in placeholders]
        constants = self._fold_input_free()
        # What dispatch specialization may look at: folded values and the weights (kiln's
        # fold_constants pass turns input-free subgraphs, e.g. ViT's all-True mask, into weights).
        self.known = {**{n: self.weights[n.name] for n in placeholders if n.name in self.weights}, **constants}
        self._exact = self._exact_readers()
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
        if node in self._absorbed:
            self._note(node, "fused", into=self._absorbed[node].name)
            return
        if node in self.plan:
            rule, args = self.dispatch.specialize(*self.plan[node], self.known)
            self.env[node] = self._emit_dispatch(node, rule, args)
            self._note(node, "dispatch", function=rule.function, rule=rule.name)
            return
        converter = self.converters.get(node.target)
        if converter is not None:  # the target's own kernel for an op the op table lacks
            self.env[node] = self._check(node, converter(self.bb, node, self.env.__getitem__))
            self._note(node, "target")
            return
        merged = self._merged_heads(node)
        if merged is not None:
            self.env[node] = merged
            self._note(node, "view", of=self._heads_last_of(node).name)
            return
        schema = getattr(node.target, "_schema", None)
        value = self._in_fp32(node) if node.target not in _DATA_MOVEMENT else self._convert(node)
        if schema is not None and schema.is_mutable:
            self._rebind_mutated(node, value)
        self.env[node] = self._check(node, value)
        self._note(node, "tir")

    def _in_fp32(self, node: fx.Node):
        """Convert ``node`` with its bf16/fp16 inputs cast to fp32; ``_check`` rounds the result back.

        That is what PyTorch's CPU kernels do for these dtypes: element-wise ops
        compute each element in float and round it once, reductions (sum, mean,
        softmax, norms) accumulate in float. TVM computing in bf16 itself summed
        in bf16 (``x.sum(-1)`` off by 0.08) and broke its layer norm, max and
        vectorized stores; casts around each op fuse into the same kernels.
        """
        low = [i for i in node.all_input_nodes if _is_low_float(i)]
        if not low:
            return self._convert(node)
        saved = {i: self.env[i] for i in low}
        try:
            for i in low:
                if node in self._exact and i.meta["val"].dtype == torch.bfloat16 and not self._stored(i):
                    self.env[i] = self._elementwise("bf16_rounded", [saved[i]], _bf16_rounded_f32)
                else:
                    self.env[i] = self.bb.emit(relax.op.astype(saved[i], "float32"))
            return self._convert(node)
        finally:
            self.env.update(saved)

    def _exact_readers(self) -> set[fx.Node]:
        """The nodes that read their bf16 inputs rounded exactly as eager's: a step function of its
        inputs (a cast to an integer, ``floor``, a comparison) and every node it is computed from
        in this graph.

        TVM's ``BF16ComputeLegalize`` computes a kernel's bf16 arithmetic in fp32 and
        rounds only at stores, and it turns a cast to bf16 into a cast to fp32: once
        FuseOps put two ops in one kernel, the first op's result was never rounded.
        That is within bf16's tolerance wherever the result is a smooth function of
        it, but for x = 2.234375, ``(x * x).to(torch.int32)`` truncated the unrounded
        4.99 to 4, where eager rounds the square to bf16's 5.0 first (fuzz seed
        181820094); ``floor``, comparisons and a mean cast to an integer differed the
        same way. Rounding everywhere cost 15% of a bf16 Llama (RoPE's kernels grew
        4x): so only where a step function reads the value, directly or not.
        """
        exact: set[fx.Node] = set()
        for node in reversed(self.gm.graph.nodes):
            if node.op != "call_function" or node in self.plan or node in self._absorbed:
                continue  # a library call reads its inputs from memory: stored, so rounded
            if node in exact or _is_step(node):
                exact.add(node)
                exact.update(i for i in node.all_input_nodes if not self._stored(i))
        return exact

    def _stored(self, node: fx.Node) -> bool:
        """Whether ``node``'s value is read from memory where it was stored rounded: an input, a weight,
        a folded constant or a library call's output, or elements moved from those."""
        if node.op == "placeholder" or node in self.plan or node in self.known:
            return True
        if node.op == "call_function" and node.target in _DATA_MOVEMENT:
            return all(self._stored(i) for i in node.all_input_nodes)
        return False

    def _convert(self, node: fx.Node):
        value = self._convert_op(node)
        if node.target in _NONFINITE_GUARDED and node.meta["val"].dtype.is_floating_point:
            value = self._nonfinite_as_torch(node, value)
        return value

    def _nonfinite_as_torch(self, node: fx.Node, value: relax.Expr) -> relax.Var:
        """``value`` where the input is finite; PyTorch's own results at +-inf, and NaN for NaN.

        TVM's fast polynomials and the frontend's composites (``elu``,
        ``hardsigmoid``) clamp their input or use min/max, so NaN came out as a
        number and ``gelu(inf)`` as inf where PyTorch gives NaN. Three selects,
        fused into the same kernel, give PyTorch's values there; the values at
        +-inf are computed by PyTorch itself, with the node's other arguments.
        """
        x = self.env[node.args[0]]
        dtype = str(x.ty.dtype)
        # In the node's own dtype and as a vector, as eager computes it: PyTorch's kernels differ there (gelu(inf)
        # is NaN in f32's and bf16's vectorized kernels, inf in f16's on a CPU without AVX512-FP16 and on a
        # one-element tensor)
        val = node.args[0].meta.get("val")
        special = torch.tensor([float("inf"), -float("inf")] * 32,
                               dtype=val.dtype if isinstance(val, torch.Tensor) else torch.float32)
        # NaN as the one canonical NaN (PyTorch's gelu(inf) is -nan: a tuning record would print it as nan)
        pos, neg = (float("nan") if v != v else v
                    for v in node.target(special, *node.args[1:], **node.kwargs)[:2].float().tolist())
        value = self.bb.emit(value) if not isinstance(value, relax.Var) else value

        def guard(v, y):
            c = functools.partial(tvm.tirx.const, dtype=dtype)
            return tvm.tirx.Select(tvm.tirx.isnan(v), v, tvm.tirx.Select(
                v == c(float("inf")), c(pos), tvm.tirx.Select(v == c(-float("inf")), c(neg), y)))
        return self._elementwise("nonfinite_as_torch", [x, value], guard)

    def _convert_op(self, node: fx.Node):
        own = self._own.get(node.target)
        if own is not None:
            return own(node)
        key = "getitem" if node.target is operator.getitem else getattr(node.target, "__name__", None)
        converter = self.imp.convert_map.get(key)
        if converter is None:
            raise UnsupportedOpError(f"node {node.name}: op {node.target} has no TVM Relax converter; "
                                     "place it on another backend", node=node.name)
        try:
            return converter(node)
        except UnsupportedOpError:
            raise
        except Exception as e:
            raise UnsupportedOpError(f"node {node.name}: TVM could not convert {node.target}: "
                                     f"{type(e).__name__}: {e}", node=node.name) from e

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
        first = args[0].meta["val"] if args and isinstance(args[0], fx.Node) else None
        if (rule.finite_flag and first is not None and first.dtype == torch.bfloat16
                and all(isinstance(d, int) for d in first.shape)):
            relax_args.append(emit_nonfinite_flag(self.bb, relax_args[0], first.shape))
        out_type = self._type(node.meta["val"])
        if rule.name in self.dispatch.heads_last_output:
            b, h, s, d = node.meta["val"].shape
            out_type = relax.TensorType([b, s, h, d], self._dtype(node.meta["val"].dtype))
        if rule.returns:
            raw = self.bb.emit(relax.op.call_pure_packed(rule.function, *relax_args, ty_args=out_type))
        else:
            raw = self.bb.emit(relax.call_dps_packed(rule.function, relax_args, out_type))
        if rule.name not in self.dispatch.heads_last_output:
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
        if node.meta["val"].dtype == torch.float32:
            # PyTorch's CPU scan accumulates float32 in double (at::acc_type): a 128-long fp32 cumsum
            # was 4x further from fp64 than eager's (fuzz seed 9000768). _check casts the result back.
            return self.bb.emit(relax.op.cumsum(self.bb.emit(relax.op.astype(x, "float64")), dim))
        if x.ty.dtype != out_dtype and not node.meta["val"].dtype.is_floating_point:
            # torch sums bools (and small ints) in int64; LLVM cannot scan a bool buffer.
            # (A bf16 scan runs on its fp32 input from _in_fp32: PyTorch accumulates bf16 in fp32.)
            x = self.bb.emit(relax.op.astype(x, out_dtype))
        return self.bb.emit(relax.op.cumsum(x, dim))

    def _cat(self, node: fx.Node) -> relax.Var:
        dim = node_arg(node, 1, "dim", 0)
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
                                     f"of size {shape[dim]}", node=node.name)
        sliced = relax.op.strided_slice(self.env[x], [dim], [i], [i + 1])
        return self.bb.emit(relax.op.squeeze(sliced, [dim]))

    def _clamp(self, node: fx.Node) -> relax.Var:
        names = ("input", "min", "max")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        return self._clamp_to(node, given.get("min"), given.get("max"), given["input"])

    def _clamp_to(self, node: fx.Node, lo, hi, x: fx.Node | None = None) -> relax.Var:
        """``min(max(x, lo), hi)`` as PyTorch computes it: NaN stays NaN, and ``hi`` wins when ``lo > hi``.

        The frontend's ``clip`` returned 3 for ``clamp(3, -3)`` (PyTorch: -3) and
        dropped NaN (LLVM's min/max); it also filled a missing bound with +-inf,
        which does not convert to an integer dtype. Two selects keep all three
        right: ``x < lo`` and ``x > hi`` are false for NaN (see ``_elementwise``).
        """
        value = self.env[x if x is not None else node.args[0]]
        dtype = str(value.ty.dtype)

        def clamp(v):
            for bound, below in ((lo, True), (hi, False)):
                if bound is not None:
                    b = tvm.tirx.const(bound, dtype)
                    v = tvm.tirx.Select(v < b if below else v > b, b, v)
            return v
        return self._elementwise("clamp", [value], clamp)

    def _relu(self, node: fx.Node) -> relax.Var:
        return self._clamp_to(node, 0, None)

    def _hardtanh(self, node: fx.Node) -> relax.Var:
        lo = node_arg(node, 1, "min_val", -1.0)
        hi = node_arg(node, 2, "max_val", 1.0)
        return self._clamp_to(node, lo, hi)

    def _extremum(self, node: fx.Node, op) -> relax.Var:
        """``maximum``/``minimum``: NaN if either side is NaN (PyTorch), which LLVM's max/min drop."""
        a, b = (self.env[v] for v in node.args[:2])
        if not node.meta["val"].dtype.is_floating_point:
            return self.bb.emit(op(a, b))
        pick = tvm.tirx.max if op is relax.op.maximum else tvm.tirx.min
        return self._elementwise(op.__name__, [a, b], lambda x, y: tvm.tirx.Select(
            tvm.tirx.isnan(x) | tvm.tirx.isnan(y), x + y, pick(x, y)))

    def _self_comparison(self, node: fx.Node) -> relax.Var:
        """``x == x`` is ``not isnan(x)``: compiled as a comparison, TVM's simplifier folded
        ``x == x`` of a bf16 ``x`` to True, NaN included."""
        a, b = node.args[:2]
        if a is not b or not a.meta["val"].dtype.is_floating_point:
            return self.imp.convert_map[node.target.__name__](node)
        return self.bb.emit(relax.op.logical_not(relax.op.isnan(self.env[a])))

    def _not_equal(self, node: fx.Node) -> relax.Var:
        """``a != b``: true where either is NaN, as in PyTorch.

        TVM's ``not_equal`` compiles to LLVM's ordered ``fcmp one``, false for NaN
        (``rsqrt(-1.3) != 0.4`` came out False).
        """
        a = node.args[0]
        if not a.meta["val"].dtype.is_floating_point:
            return self.imp.convert_map[node.target.__name__](node)
        b = node.args[1]
        other = self.env[b] if isinstance(b, fx.Node) else relax.const(b, str(self.env[a].ty.dtype))
        x = self.env[a]
        if b is a:
            return self.bb.emit(relax.op.isnan(x))
        # (not a == b) would be simplified straight back to a != b
        return self._elementwise("not_equal", [x, other], lambda u, v: tvm.tirx.isnan(u) | tvm.tirx.isnan(v) | (u != v))

    def _clamp_tensor(self, node: fx.Node) -> relax.Var:
        """``clamp`` with tensor bounds: NaN in ``x`` or in a bound gives NaN, and ``max`` wins over ``min``."""
        names = ("input", "min", "max")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        floating = node.meta["val"].dtype.is_floating_point
        names = [n for n in ("min", "max") if given.get(n) is not None]

        def clamp(v, *bounds):
            for name, b in zip(names, bounds):
                picked = v < b if name == "min" else v > b
                v = tvm.tirx.Select(picked | tvm.tirx.isnan(b) if floating else picked, b, v)
            return v
        return self._elementwise("clamp", [self.env[given["input"]]] + [self.env[given[n]] for n in names], clamp)

    def _variance(self, node: fx.Node) -> relax.Var:
        """``var``/``std`` over ``dim`` with Bessel's ``correction`` (the frontend ignored a ``correction=``
        argument: ``std(0, correction=1)`` came out as the population std). Two passes; ``_check`` casts
        the result back to the node's dtype."""
        x = self.env[node.args[0]]
        dims, count, correction, keepdim = _variance_args(node)
        # In float64, as PyTorch's CPU kernel accumulates: squares of large values overflow float32.
        x = self.bb.emit(relax.op.astype(x, "float64"))
        centered = self.bb.emit(relax.op.subtract(x, relax.op.mean(x, dims, keepdims=True)))
        squares = relax.op.sum(relax.op.multiply(centered, centered), dims, keepdims=keepdim)
        var = self.bb.emit(relax.op.divide(squares, relax.const(float(count - correction), "float64")))
        return self.bb.emit(relax.op.sqrt(var)) if node.target.overloadpacket is aten.std else var

    def _elementwise(self, name: str, inputs: list[relax.Expr], scalar_fn) -> relax.Var:
        """One element-wise kernel ``out[i] = scalar_fn(a[i], b[i], ...)`` (inputs broadcast to one shape).

        The selects that keep NaN (``where(x < lo, lo, x)``) read their input two
        to four times; the CPU schedule inlines a producer into such a reader only
        while the copies stay small (``schedule._inline_bounded``): three chained
        clamps took 214 s to compile when every read got a copy of the chain.
        (A ``Let`` per input would keep one copy, but TVM then rebinds one variable
        twice when the kernel is inlined into a reader of two elements.)
        """
        shape = [int(d) for d in _broadcast_shape([list(x.ty.shape) for x in inputs])]
        inputs = [x if [int(d) for d in x.ty.shape] == shape else self.bb.emit(relax.op.broadcast_to(x, shape))
                  for x in inputs]

        def compute(*tensors):
            return tvm.te.compute(tensors[0].shape, lambda *i: scalar_fn(*(t(*i) for t in tensors)), name=name)

        return self.bb.emit_te(compute, *inputs, primfunc_name_hint=name)

    def _layer_norm(self, node: fx.Node) -> relax.Var:
        """``layer_norm`` with or without its affine weight and bias (the frontend needed both)."""
        x = self.env[node.args[0]]
        shape = list(node.args[1])
        weight = node_arg(node, 2, "weight")
        bias = node_arg(node, 3, "bias")
        eps = node_arg(node, 4, "eps", 1e-5)
        dtype = str(x.ty.dtype)
        gamma = self.env[weight] if weight is not None else relax.const(torch.ones(shape).numpy().astype(dtype))
        beta = self.env[bias] if bias is not None else relax.const(torch.zeros(shape).numpy().astype(dtype))
        axes = list(range(-len(shape), 0))
        return self.bb.emit(relax.op.nn.layer_norm(x, gamma, beta, axes, eps))

    def _div_mode(self, node: fx.Node) -> relax.Var:
        """Integer ``div(x, c, rounding_mode="floor"|"trunc")`` by a constant ``c`` (the frontend made it int32).

        The op table (``convertible``) sends every other case to PyTorch: a
        divisor tensor may hold 0 (PyTorch raises; TVM's integer division traps),
        and float floor division follows PyTorch's own rounding rules.
        """
        x, divisor = self.env[node.args[0]], node.args[1]
        mode = node.kwargs.get("rounding_mode", node.args[2] if len(node.args) > 2 else None)
        dtype = x.ty.dtype
        if mode == "floor":
            return self.bb.emit(relax.op.floor_divide(x, relax.const(divisor, dtype)))
        return self.bb.emit_te(lambda t: tvm.te.compute(t.shape, lambda *i: tvm.tirx.truncdiv(
            t(*i), tvm.tirx.const(divisor, dtype))), x, primfunc_name_hint="trunc_divide")

    def _diff(self, node: fx.Node) -> relax.Var:
        n = node_arg(node, 1, "n", 1)
        dim = node_arg(node, 2, "dim", -1)
        prepend = node_arg(node, 3, "prepend")
        append = node_arg(node, 4, "append")
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
            # bf16 and fp16 arrive here as fp32 (``_in_fp32``); float64 keeps libm's precision.
            if str(self.env[node.args[0]].ty.dtype) != "float32":
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
        if exponent in (0.5, -0.5) and node.meta["val"].dtype.is_floating_point:
            # PyTorch takes these as sqrt / rsqrt: (-inf) ** 0.5 is NaN there, inf in libm's pow.
            return self.bb.emit(relax.op.sqrt(x) if exponent == 0.5 else relax.op.rsqrt(x))
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
                                     f"{[int(s) for s in ty.shape]}, PyTorch {list(val.shape)}", node=node.name)
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
    bridge = _Bridge(fx.GraphModule(torch.nn.Module(), fx.Graph()), LibraryDispatch((), abi=0), {})
    return frozenset(bridge._own), frozenset(bridge.imp.convert_map)


def _broadcast_shape(shapes: list[list]) -> list:
    """NumPy broadcasting of static shapes."""
    rank = max(len(s) for s in shapes)
    padded = [[1] * (rank - len(s)) + [int(d) for d in s] for s in shapes]
    return [max(dims) for dims in zip(*padded)]


def _bf16_rounded_f32(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """bf16 ``x`` as fp32, rounded to bf16 by its bits (nearest, ties to even; NaN kept).

    Bit arithmetic, because TVM's bf16 legalization drops a cast's rounding
    (``_Bridge._stored``); these integer ops survive it and vectorize.
    """
    f = x.astype("float32")
    u = tvm.tirx.reinterpret("uint32", f)
    one = tvm.tirx.const(1, "uint32")
    rounded = (u + tvm.tirx.const(0x7FFF, "uint32") + ((u >> 16) & one)) & tvm.tirx.const(0xFFFF0000, "uint32")
    return tvm.tirx.Select(tvm.tirx.isnan(f), f, tvm.tirx.reinterpret("float32", rounded))


def _is_low_float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype in (torch.bfloat16, torch.float16)


# Unary ops computed by TVM's fast polynomials or the frontend's composites, which get
# NaN and +-inf wrong (see _Bridge._nonfinite_as_torch).
_NONFINITE_GUARDED = {
    aten.exp.default, aten.sigmoid.default, aten.silu.default, aten.tanh.default, aten.erf.default,
    aten.gelu.default, aten.elu.default, aten.hardsigmoid.default, aten.softplus.default, aten.mish.default,
    aten.hardswish.default, aten.leaky_relu.default,
}

# Ops that only move or select elements: exact in any dtype, so bf16 stays bf16 through them.
_DATA_MOVEMENT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.cat.default,
    aten.stack.default, aten.clone.default, aten.alias.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.flatten.using_ints, aten.narrow.default, aten.contiguous.default, operator.getitem,
}


# Ops whose result is a continuous function of their floating-point inputs: reading an input
# unrounded (``_Bridge._exact_readers``) moves the result within bf16's tolerance. Any other op
# (a cast to an integer or bool, floor, round, a comparison, isnan) reads its inputs rounded.
_SMOOTH = frozenset("""
    abs neg exp log log1p log2 sqrt rsqrt sin cos tan tanh sigmoid silu gelu erf relu hardtanh
    leaky_relu hardswish hardsigmoid reciprocal square clamp clamp_min clamp_max maximum minimum
    where masked_fill add sub rsub mul pow full_like zeros_like ones_like
    sum mean var std prod logsumexp softmax _softmax log_softmax _log_softmax layer_norm cumsum
    avg_pool1d avg_pool2d adaptive_avg_pool1d adaptive_avg_pool2d pad constant_pad_nd diff
""".split()) | {op.overloadpacket.__name__ for op in _DATA_MOVEMENT if op is not operator.getitem}


def _is_step(node: fx.Node) -> bool:
    """Whether ``node`` is not known to be a continuous function of its inputs (see ``_SMOOTH``)."""
    name = _packet(node.target) or getattr(node.target, "__name__", None)
    if name == "div":  # true division is smooth; a rounding mode makes it a step
        return node.target not in (aten.div.Tensor, aten.div.Scalar)
    if name in ("_to_copy", "to", "type_as"):  # a cast: smooth into a floating-point dtype
        val = node.meta.get("val")
        return not (isinstance(val, torch.Tensor) and val.dtype.is_floating_point)
    return name not in _SMOOTH


def _int_divisor(node: fx.Node) -> bool:
    """An integer tensor divided by a non-zero Python integer (a divisor tensor may hold 0: PyTorch raises)."""
    x, divisor = node.args[:2]
    return (isinstance(x, fx.Node) and not x.meta["val"].dtype.is_floating_point
            and isinstance(divisor, int) and not isinstance(divisor, bool) and divisor != 0)


def _variance_args(node: fx.Node) -> tuple[list[int], int, float, bool]:
    """``(dims, elements reduced, correction, keepdim)`` of a ``var``/``std`` node (``.dim``: ``unbiased``;
    ``.correction``); ``dims`` non-negative, all of them when the node gives none."""
    shape = node.args[0].meta["val"].shape
    dims = node_arg(node, 1, "dim")
    dims = list(range(len(shape))) if dims is None else [d % len(shape) for d in dims]
    count = math.prod(shape[d] for d in dims)
    if node.target.__name__.endswith(".dim"):
        unbiased = node_arg(node, 2, "unbiased", True)
        keepdim = node_arg(node, 3, "keepdim", False)
        return dims, count, 1.0 if unbiased else 0.0, keepdim
    correction = node.kwargs.get("correction")
    return dims, count, 1.0 if correction is None else float(correction), node.kwargs.get("keepdim", False)


def _positive_variance_divisor(node: fx.Node) -> bool:
    """``N - correction > 0``: otherwise PyTorch gives NaN or inf from a division by zero, which TVM
    may fold; such a ``var``/``std`` runs on PyTorch."""
    if not _float_inputs(node):
        return False
    _, count, correction, _ = _variance_args(node)
    return count - correction > 0


def _float_inputs(node: fx.Node) -> bool:
    """Every tensor argument is floating point (sums of integers accumulate in int64 in PyTorch; integer
    true division by a tensor may divide by 0, which traps in TVM's integer code)."""
    return all(a.meta["val"].dtype.is_floating_point for a in node.all_input_nodes
               if isinstance(a.meta.get("val"), torch.Tensor))


# The op table of kiln's TVM lowering: the ops whose lowering is known right, each with the
# condition under which it is (None: always). Everything else runs on PyTorch.
# Known right means: the zoo models' end-to-end tests and the differential fuzzer
# (tests/fuzz) cover it in fp32 and bf16 against eager and an fp64 reference.
# Left out on purpose, each for a wrong result seen or a semantics TVM lacks:
# max/min/argmax/argmin reductions, sort and topk (NaN, ties), conv1d and other TIR
# convolutions (conv1d k=1 stride 2 was wrong), advanced indexing (``index.Tensor``:
# an unchecked take read out of bounds), scatter/index_put/take (unchecked indices),
# integer division by a tensor (0 traps in TVM, PyTorch raises), float remainder and
# floor division (PyTorch's rounding rules), random ops, and expm1 / elu / softplus / mish
# (TVM computes exp(x) - 1 and log(1 + exp(x)): 1e-2 relative error near 0).
_POINTWISE = """
    abs neg exp log log1p log2 sqrt rsqrt sin cos tan tanh sigmoid silu gelu erf relu hardtanh
    leaky_relu hardswish hardsigmoid reciprocal sign floor ceil round trunc square
    clamp clamp_min clamp_max maximum minimum where masked_fill
    add sub rsub mul div pow eq ne lt le gt ge logical_not logical_and logical_or bitwise_and bitwise_or
    bitwise_xor bitwise_not __and__ __or__ __xor__ isnan isinf
    _to_copy to type_as full_like zeros_like ones_like
""".split()
_STRUCTURED = """
    sum mean var std prod logsumexp softmax _softmax log_softmax _log_softmax layer_norm cumsum
    avg_pool1d avg_pool2d adaptive_avg_pool1d adaptive_avg_pool2d pad constant_pad_nd
    arange full zeros ones scalar_tensor diff
""".split()
# Reductions and true division: on floating-point inputs only (see _float_inputs).
_FLOAT_ONLY = set("""
    sum mean var std prod logsumexp softmax _softmax log_softmax _log_softmax layer_norm avg_pool1d avg_pool2d
    adaptive_avg_pool1d adaptive_avg_pool2d
""".split())
def _pointwise_sources(node: fx.Node, depth: int = 6) -> set[fx.Node]:
    """``node`` and what it is computed from through up to ``depth`` point-wise ops (one fused kernel)."""
    seen, frontier = {node}, [node]
    for _ in range(depth):
        frontier = [i for n in frontier if n.op == "call_function" and torch.Tag.pointwise in getattr(
            n.target, "tags", ()) for i in n.all_input_nodes if i not in seen]
        seen.update(frontier)
    return seen


def _no_cancellation(node: fx.Node) -> bool:
    """Not ``a - b`` of a fused ``a`` and ``b`` that read the same value.

    TVM's simplifier rewrites float ``x - x`` to 0 and ``(x + 1) - x`` to 1 in the
    fused kernel (it assumes no NaN or inf), so NaN and inf inputs came out as
    numbers; PyTorch computes the subtraction.
    """
    a, b = node.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or not node.meta["val"].dtype.is_floating_point:
        return True
    return not (_pointwise_sources(a) & _pointwise_sources(b))


def _no_literal_zero_factor(node: fx.Node) -> bool:
    """Not ``x * 0``: TVM folds it to 0 for floats, where PyTorch gives NaN for NaN and inf."""
    factors = node.args[:2]
    return not (node.meta["val"].dtype.is_floating_point
                and any(isinstance(f, (int, float)) and not isinstance(f, bool) and f == 0 for f in factors))


_CONDITIONS: dict[str, object] = {
    "sub.Tensor": _no_cancellation,
    "rsub.Tensor": _no_cancellation,
    "mul.Tensor": _no_literal_zero_factor,
    "mul.Scalar": _no_literal_zero_factor,
    "div.Tensor_mode": _int_divisor,
    # Float remainder follows PyTorch's own rounding (off by 4e22 at 1e30 in bf16): on PyTorch.
    "remainder.Scalar": _int_divisor,
    "floor_divide.Scalar": _int_divisor,
    "var.dim": _positive_variance_divisor,
    "var.correction": _positive_variance_divisor,
    "std.dim": _positive_variance_divisor,
    "std.correction": _positive_variance_divisor,
}
_ALLOWED_NAMES = frozenset(_POINTWISE + _STRUCTURED) | {op.__name__ for op in _DATA_MOVEMENT
                                                         if op is not operator.getitem}


def _packet(target) -> str | None:
    return target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else None


def convertible(node: fx.Node, dispatch: LibraryDispatch) -> bool:
    """Whether a TVM target with library ``dispatch`` lowers this ``call_function`` node: a dispatch rule
    takes it, or it is in the op table and TVM has a converter."""
    own, frontend = _op_table()
    target = node.target
    if target in _NO_VALUE:
        return True
    if target is operator.getitem:  # an element of a tuple: lowered where the tuple is
        return isinstance(node.args[0], fx.Node) and convertible(node.args[0], dispatch)
    if target in dispatch.dispatched_ops:
        return dispatch.dispatches(node)  # the library's own kernel, called from the TVM library; never as TIR
    name = getattr(target, "__name__", None)
    if target not in own and name not in frontend:
        return False
    condition = _CONDITIONS.get(name)
    if condition is not None:
        return bool(condition(node))
    if _packet(target) not in _ALLOWED_NAMES and name not in _ALLOWED_NAMES:
        return False
    if _packet(target) == "div" and name not in ("div.Tensor", "div.Scalar"):
        return False  # div with a rounding mode: only by _CONDITIONS' rule above
    if _packet(target) in _FLOAT_ONLY or _packet(target) == "div":
        return _float_inputs(node)
    return True


def to_relax(gm: fx.GraphModule, dispatch: LibraryDispatch, plan: Plan, name: str = "main",
             weights: dict[str, torch.Tensor] | None = None,
             converters: dict | None = None) -> tuple[tvm.IRModule, list[dict]]:
    """The Relax module for ``gm`` (one function ``name``, params = placeholders) and a per-node report.

    ``plan`` is ``dispatch``'s plan of ``gm`` (after any target stage refined it). ``weights`` (by
    placeholder name) are read only to specialize dispatch calls (an all-True mask is dropped).
    ``converters``: the target's own (``TvmTarget.converters``), tried before the op table.
    """
    bridge = _Bridge(gm, dispatch, plan, weights, converters)
    return bridge.convert(name), bridge.report
