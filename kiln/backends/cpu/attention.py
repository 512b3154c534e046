"""Decode attention on the ``cpu`` target: one query row per head, as a generated TVM kernel.

A decode step's ``scaled_dot_product_attention`` (``q [B, H, 1, D]`` against ``k, v [B, H, S, D]``) is
little work (a DyQ decode step's: 16 heads x 65 keys x 128) but as PyTorch's fused kernel, called from
the TVM library, it costs ~150 us a call: ~100 us on one PyTorch thread (a quantized program runs
PyTorch on one and lends the cores to TVM's pool) reading K and V that TVM's kernels just wrote, and
~50 us of Python around it. Here it is a TIR kernel over TVM's pool, heads across the cores, vectorized
over D: for each head, the scores ``q . k_s * scale``, their maximum, ``exp(score - max)`` and the
weighted sum of ``v`` over the exponentials' sum, in fp32 (eager's fused kernel: fp32 with blocked
online softmax; the two agree to fp32 rounding, ``tests/backends/test_decode_attention.py``).

Non-finite inputs: PyTorch's fused kernel gives layout-dependent results for NaN and inf (FINDINGS F7,
F10), which only eager's own call reproduces. The kernel also writes, per head, whether any score or the
sum of the head's outputs is non-finite: a NaN or inf in q or k makes a score NaN or inf (``0 * inf`` is
NaN), one in v makes an output so, and finite inputs whose scores overflow are flagged too. The checked
call (``kiln.sdpa_decode_checked``, ``kiln.runtime.kernels.tvm_dispatch``) returns the kernel's output
when no head is flagged, and otherwise eager's attention on q, k and v laid out with eager's strides.

Which calls it takes (``decodes``): fp32 q, k, v of 4 dimensions with static shapes, one query row, the
same batch and heads (no GQA), D a multiple of 16, no mask, not causal, no dropout.
"""
from __future__ import annotations

import functools
import math

import torch
import tvm
from tvm.script import tirx as T

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_L = 16  # fp32 lanes of a vector


def _arg(node, i, name, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def decodes(node) -> bool:
    """Whether this ``scaled_dot_product_attention`` node is a decode attention the kernel computes."""
    if node.target is not SDPA:
        return False
    q, k, v = node.args[:3]
    vals = [getattr(t, "meta", {}).get("val") for t in (q, k, v)]
    if any(not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 4 for t in vals):
        return False
    if not all(isinstance(d, int) for t in vals for d in t.shape):
        return False
    (b, h, l, d), (bk, hk, s, dk), (bv, hv, sv, dv) = (tuple(t.shape) for t in vals)
    if l != 1 or (b, h) != (bk, hk) or (b, h) != (bv, hv) or s != sv or d != dk or d != dv or d % _L or s < 1:
        return False
    return (_arg(node, 3, "attn_mask") is None and _arg(node, 4, "dropout_p", 0.0) == 0.0
            and not _arg(node, 5, "is_causal", False) and not node.kwargs.get("enable_gqa", False))


def eager_strides(q, k, v) -> list[int] | None:
    """The strides eager's q, k and v have (from the traced values): ``[ndim, *q, *k, *v]``, or None when one is
    not known as ints. The runtime lays non-finite inputs out so before PyTorch's fused attention, whose
    NaN handling depends on the layout (``kiln.runtime.kernels.tvm_dispatch._attention``)."""
    vals = [n.meta["val"] for n in (q, k, v)]
    if len({t.dim() for t in vals}) != 1:
        return None
    strides = [s for t in vals for s in t.stride()]
    return [vals[0].dim(), *strides] if all(isinstance(s, int) for s in strides) else None


def scale_of(node) -> float:
    scale = node.kwargs.get("scale")
    return 1 / math.sqrt(node.args[0].meta["val"].shape[-1]) if scale is None else float(scale)


@functools.lru_cache(maxsize=64)
def decode_attention_func(b: int, h: int, s: int, d: int, scale: float) -> tvm.tirx.PrimFunc:
    """``out [b, h, 1, d]`` and ``bad [b * h]`` (int32, 1 where a head's scores or output sum is non-finite)
    from ``q [b, h, 1, d]``, ``k, v [b, h, s, d]`` (fp32)."""
    dc = d // _L

    @T.prim_func(private=True)
    def f(q: T.Buffer((b, h, 1, d), "float32"), k: T.Buffer((b, h, s, d), "float32"),
          v: T.Buffer((b, h, s, d), "float32"), out: T.Buffer((b, h, 1, d), "float32"),
          bad: T.Buffer((b * h,), "int32")):
        T.func_attr({"tirx.noalias": True})
        for bh in T.parallel(b * h):
            sc = T.alloc_buffer((s,), "float32")  # the head's scores, then their exponentials
            acc = T.alloc_buffer((_L,), "float32", scope="local")
            o = T.alloc_buffer((d,), "float32", scope="local")
            st = T.alloc_buffer((2,), "float32", scope="local")  # running max, then the exponentials' sum
            fl = T.alloc_buffer((1,), "int32", scope="local")
            st[0] = T.float32(-math.inf)
            fl[0] = 0
            for t in range(s):
                acc[T.ramp(0, 1, _L)] = T.broadcast(T.float32(0), _L)
                for c in range(dc):
                    acc[T.ramp(0, 1, _L)] = acc[T.ramp(0, 1, _L)] + q[bh // h, bh % h, 0, T.ramp(c * _L, 1, _L)] * k[
                        bh // h, bh % h, t, T.ramp(c * _L, 1, _L)]
                acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + acc[T.ramp(8, 1, 8)]
                acc[T.ramp(0, 1, 4)] = acc[T.ramp(0, 1, 4)] + acc[T.ramp(4, 1, 4)]
                acc[T.ramp(0, 1, 2)] = acc[T.ramp(0, 1, 2)] + acc[T.ramp(2, 1, 2)]
                sc[t] = (acc[0] + acc[1]) * T.float32(scale)
                if not T.isfinite(sc[t]):
                    fl[0] = 1
                st[0] = T.max(st[0], sc[t])
            st[1] = T.float32(0)
            for t in range(s):
                sc[t] = T.exp(sc[t] - st[0])
                st[1] = st[1] + sc[t]
            for c in range(dc):
                o[T.ramp(c * _L, 1, _L)] = T.broadcast(T.float32(0), _L)
            for t in range(s):
                for c in range(dc):
                    o[T.ramp(c * _L, 1, _L)] = o[T.ramp(c * _L, 1, _L)] + T.broadcast(sc[t], _L) * v[
                        bh // h, bh % h, t, T.ramp(c * _L, 1, _L)]
            acc[T.ramp(0, 1, _L)] = T.broadcast(T.float32(0), _L)
            for c in range(dc):
                out[bh // h, bh % h, 0, T.ramp(c * _L, 1, _L)] = o[T.ramp(c * _L, 1, _L)] / T.broadcast(st[1], _L)
                acc[T.ramp(0, 1, _L)] = acc[T.ramp(0, 1, _L)] + out[bh // h, bh % h, 0, T.ramp(c * _L, 1, _L)]
            acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + acc[T.ramp(8, 1, 8)]
            acc[T.ramp(0, 1, 4)] = acc[T.ramp(0, 1, 4)] + acc[T.ramp(4, 1, 4)]
            acc[T.ramp(0, 1, 2)] = acc[T.ramp(0, 1, 2)] + acc[T.ramp(2, 1, 2)]
            if not T.isfinite(acc[0] + acc[1]):
                fl[0] = 1
            bad[bh] = fl[0]

    return f


def convert_decode_attention(bb, node, value_of):
    """Emit ``node`` into Relax: the kernel, then ``kiln.sdpa_decode_checked`` (its output, or eager's attention
    where a head was flagged, given eager's strides, ``eager_strides``)."""
    from tvm import relax

    q, k, v = node.args[:3]
    strides = eager_strides(q, k, v)
    b, h, _, d = node.args[0].meta["val"].shape
    s = k.meta["val"].shape[2]
    func = decode_attention_func(b, h, s, d, scale_of(node)).with_attr("tirx.is_scheduled", True)
    name = f"kiln_decode_attention_b{b}_h{h}_s{s}_d{d}"
    gv = bb.add_func(func.with_attr("global_symbol", name), name)
    args = [value_of(q), value_of(k), value_of(v)]
    res = bb.emit(relax.call_tir(gv, args, [relax.TensorType([b, h, 1, d], "float32"),
                                             relax.TensorType([b * h], "int32")]))
    out, bad = bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))
    eager_scale = node.kwargs.get("scale")  # as eager passed it (None: 0.0), for eager's call on non-finite inputs
    flags = [relax.prim_value(tvm.tirx.FloatImm("float64", 0.0 if eager_scale is None else float(eager_scale)))]
    flags += [relax.prim_value(int(x)) for x in strides]
    return bb.emit(relax.op.call_pure_packed("kiln.sdpa_decode_checked", *args, out, bad, *flags,
                                             ty_args=relax.TensorType([b, h, 1, d], "float32")))
