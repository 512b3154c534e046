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
NaN), one in v makes an output so, and finite inputs whose scores overflow are flagged too. When a head
is flagged the kernel calls ``kiln.sdpa_decode_fallback`` (``kiln.runtime.kernels.tvm_dispatch``), which
writes eager's attention on q, k and v, laid out with eager's strides, over the kernel's output; otherwise
no Python runs (a Python call from the VM cost ~40 us here).

Which calls it takes (``decodes``): fp32 q, k, v of 4 dimensions with static shapes, one query row, the
same batch and heads (no GQA), D a multiple of 16, no mask, not causal, no dropout.
"""
from __future__ import annotations

import functools
import math

import torch
import tvm
from tvm.script import tirx as T

from ...ir.rewrite import node_arg
from .lowbit import fold_lanes

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_L = 16  # fp32 lanes of a vector


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
    return (node_arg(node, 3, "attn_mask") is None and node_arg(node, 4, "dropout_p", 0.0) == 0.0
            and not node_arg(node, 5, "is_causal", False) and not node.kwargs.get("enable_gqa", False))


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


FALLBACK = "kiln.sdpa_decode_fallback"  # kiln.runtime.kernels.tvm_dispatch: eager's attention into ``out``


@functools.lru_cache(maxsize=64)
def decode_attention_func(b: int, h: int, s: int, d: int, scale: float, eager_scale: float = 0.0,
                          strides: tuple[int, ...] = ()) -> tvm.tirx.PrimFunc:
    """``out [b, h, 1, d]`` from ``q [b, h, 1, d]``, ``k, v [b, h, s, d]`` (fp32), with ``scale``; where a head's
    scores or output sum is not finite, the kernel then calls ``FALLBACK`` with q, k, v, out, ``eager_scale``
    (eager's ``scale`` argument, None as 0.0) and ``strides`` (eager's, ``eager_strides``)."""
    dc = d // _L

    @T.prim_func(private=True)
    def f(q: T.Buffer((b, h, 1, d), "float32"), k: T.Buffer((b, h, s, d), "float32"),
          v: T.Buffer((b, h, s, d), "float32"), out: T.Buffer((b, h, 1, d), "float32")):
        T.func_attr({"tirx.noalias": True})
        bad = T.alloc_buffer((b * h,), "int32")  # 1 where a head's scores or output sum is not finite
        any_bad = T.alloc_buffer((1,), "int32")
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
                fold_lanes(acc, 0, _L, False)
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
            fold_lanes(acc, 0, _L, False)
            if not T.isfinite(acc[0] + acc[1]):
                fl[0] = 1
            bad[bh] = fl[0]
        any_bad[0] = 0
        for i in range(b * h):
            any_bad[0] = T.max(any_bad[0], bad[i])
        if any_bad[0] > 0:  # eager's attention into out (only then a Python call)
            T.evaluate(T.call_packed(FALLBACK, q, k, v, out, T.float64(eager_scale), *[T.int64(x) for x in strides]))

    return f


def convert_decode_attention(bb, node, value_of):
    """Emit ``node`` into Relax: ``R.call_tir`` of the kernel (which calls ``FALLBACK`` itself where a head was
    flagged)."""
    from tvm import relax

    q, k, v = node.args[:3]
    strides = eager_strides(q, k, v)
    b, h, _, d = node.args[0].meta["val"].shape
    s = k.meta["val"].shape[2]
    eager_scale = node.kwargs.get("scale")  # as eager passed it (None: 0.0), for eager's call on non-finite inputs
    func = decode_attention_func(b, h, s, d, scale_of(node), 0.0 if eager_scale is None else float(eager_scale),
                                 tuple(strides)).with_attr("tirx.is_scheduled", True)
    name = f"kiln_decode_attention_b{b}_h{h}_s{s}_d{d}"
    gv = bb.add_func(func.with_attr("global_symbol", name), name)
    return bb.emit(relax.call_tir(gv, [value_of(q), value_of(k), value_of(v)],
                                  relax.TensorType([b, h, 1, d], "float32")))
