"""Attention on the ``cpu`` target as generated TVM kernels: decode (one query row per head) and prefill.

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

Prefill (``prefills``: more query rows, a multiple of 4, keys a multiple of 16, D 16 or 32; optionally a 4-D
bool or fp32 mask, no causal flag, no GQA): per head and block of ``R`` query rows, the block's scores against
all keys in 16-lane vectors (k transposed once per head, so a score vector is R broadcast-FMAs per element of
D), its row maxima, exponentials by TVM's fast_exp polynomial (``_fast_exp``: the one kiln's fp32 ``exp``
uses; a masked score's is exactly 0), and the weighted sum of v in registers. On MiniLM's 12 heads x 128 x 32,
on an AMD EPYC (Zen 5): PyTorch's fused kernel 215 us, this kernel 106 us on two TVM threads and about
PyTorch's time on the one TVM thread an fp32 program gives it (``tvm_vm._size_tvm_pool``); in the model,
1.08x (the library call's Python, its mask check and its layout copies go too).
A bool mask becomes fp32's 0 / -inf first (what PyTorch does with one). Flagged, then eager's attention
(``kiln.sdpa_decode_fallback``, ``kiln.sdpa_masked_fallback``) over the whole output: a raw score (before
the mask) that is not finite, a row whose masked scores' maximum is not finite (all masked, or a mask of
+inf), a block whose output sum is not finite.
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
# Prefill heads up to this wide: at D=32 (MiniLM) the kernel took the model 1.08x faster than PyTorch's fused
# attention in one-process A/Bs on an AMD EPYC (Zen 5); at D=64 (BERT) 0.995x, so PyTorch's kernel keeps it.
_PREFILL_MAX_D = 32


def _shapes(node):
    """``(b, h, l, d), s`` of an sdpa node on fp32 4-D q, k, v of static shapes with the same batch and heads (no
    GQA) and matching key / value lengths and widths; None for any other node."""
    if node.target is not SDPA:
        return None
    vals = [getattr(t, "meta", {}).get("val") for t in node.args[:3]]
    if any(not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 4 for t in vals):
        return None
    if not all(isinstance(d, int) for t in vals for d in t.shape):
        return None
    (b, h, l, d), (bk, hk, s, dk), (bv, hv, sv, dv) = (tuple(t.shape) for t in vals)
    if (b, h) != (bk, hk) or (b, h) != (bv, hv) or s != sv or d != dk or d != dv or s < 1:
        return None
    return (b, h, l, d), s


def _plain(node) -> bool:
    """No dropout, no causal flag, no GQA."""
    return (node_arg(node, 4, "dropout_p", 0.0) == 0.0 and not node_arg(node, 5, "is_causal", False)
            and not node.kwargs.get("enable_gqa", False))


def decodes(node) -> bool:
    """Whether this ``scaled_dot_product_attention`` node is a decode attention the kernel computes."""
    shapes = _shapes(node)
    if shapes is None:
        return False
    (_, _, l, d), _ = shapes
    return l == 1 and d % _L == 0 and node_arg(node, 3, "attn_mask") is None and _plain(node)


def prefills(node) -> bool:
    """Whether this ``scaled_dot_product_attention`` node is a prefill attention the kernel computes."""
    shapes = _shapes(node)
    if shapes is None:
        return False
    (b, h, l, d), s = shapes
    if l < 2 or l % 4 or s % _L or d % _L or d > _PREFILL_MAX_D or not _plain(node):
        return False
    mask = node_arg(node, 3, "attn_mask")
    if mask is not None:
        m = getattr(mask, "meta", {}).get("val")
        if (not isinstance(m, torch.Tensor) or m.dtype not in (torch.float32, torch.bool) or m.dim() != 4
                or not all(isinstance(x, int) for x in m.shape)):
            return False
        mb, mh, mq, mk = m.shape
        if mb not in (1, b) or mh not in (1, h) or mq not in (1, l) or mk != s:
            return False
    return True


def computes(node) -> bool:
    """Whether one of this module's kernels computes the attention node (decode or prefill)."""
    return decodes(node) or prefills(node)


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
MASKED_FALLBACK = "kiln.sdpa_masked_fallback"  # the same with an fp32 mask


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


def _vec(value: float):
    return T.broadcast(T.float32(value), _L)


def _fast_exp(x):
    """``exp`` of a float32x16 vector: TVM's ``fast_exp`` polynomial (Cephes'; what kiln's fp32 ``exp`` lowers to).
    Below -88.38 it is clamped there, where its power of two ``2^(n+127 << 23)`` has exponent bits 0: exactly 0,
    so a masked score (-inf) weighs nothing, as in eager (``test_a_masked_key_weighs_exactly_nothing``)."""
    xc = T.max(T.min(x, _vec(88.3762626647950)), _vec(-88.3762626647949))
    n = T.floor(xc * _vec(1.44269504088896341) + _vec(0.5))
    z = xc - n * _vec(0.6931471805599453)
    y = z * _vec(1.9875691500e-4) + _vec(1.3981999507e-3)
    y = y * z + _vec(8.3334519073e-3)
    y = y * z + _vec(4.1665795894e-2)
    y = y * z + _vec(1.6666665459e-1)
    y = y * z + _vec(5.0000001201e-1)
    y = y * z * z + z + _vec(1.0)
    two_n = T.reinterpret("float32x16", T.shift_left(T.Cast("int32x16", n) + T.broadcast(T.int32(127), _L),
                                                      T.broadcast(T.int32(23), _L)))
    return y * two_n


@functools.lru_cache(maxsize=64)
def prefill_attention_func(b: int, h: int, l: int, s: int, d: int, scale: float, mask_shape: tuple[int, ...] = (),
                           eager_scale: float = 0.0, strides: tuple[int, ...] = ()) -> tvm.tirx.PrimFunc:
    """``out [b, h, l, d]`` from ``q [b, h, l, d]``, ``k, v [b, h, s, d]`` (fp32) and, with ``mask_shape``, an fp32
    additive ``mask`` of that 4-D shape (broadcast over batch, heads and rows where its dimension is 1); where a
    block is flagged (module docstring) the kernel then calls the fallback with the inputs, ``out``,
    ``eager_scale`` and ``strides``."""
    r_rows = 8 if d <= 32 else 4  # query rows per task: R x 16-lane score accumulators and R x D output lanes
    if l % r_rows:
        r_rows = 4
    dc, sc, blocks = d // _L, s // _L, l // r_rows
    masked = bool(mask_shape)
    mb, mh, mq, _ = mask_shape or (1, 1, 1, s)
    sel_b, sel_h, sel_q = int(mb > 1), int(mh > 1), int(mq > 1)  # the mask's index along b, h, rows (or 0)

    @T.prim_func(private=True)
    def f(q: T.Buffer((b, h, l, d), "float32"), k: T.Buffer((b, h, s, d), "float32"),
          v: T.Buffer((b, h, s, d), "float32"), mask: T.Buffer((mb, mh, mq, s), "float32"),
          out: T.Buffer((b, h, l, d), "float32")):
        T.func_attr({"tirx.noalias": True})
        kt = T.alloc_buffer((b * h, d, s), "float32")  # each head's k transposed: a score vector's 16 keys in a row
        bad = T.alloc_buffer((b * h * blocks,), "int32")
        any_bad = T.alloc_buffer((1,), "int32")
        for bh in T.parallel(b * h):
            for t in range(s):
                for c in range(d):
                    kt[bh, c, t] = k[bh // h, bh % h, t, c]
        for task in T.parallel(b * h * blocks):
            p = T.alloc_buffer((r_rows, s), "float32")  # the block's scores, then their exponentials
            acc = T.alloc_buffer((r_rows * _L,), "float32", scope="local")
            chk = T.alloc_buffer((_L,), "float32", scope="local")
            o = T.alloc_buffer((r_rows * d,), "float32", scope="local")
            st = T.alloc_buffer((2 * r_rows,), "float32", scope="local")  # row maxima, then exponentials' sums
            fl = T.alloc_buffer((1,), "int32", scope="local")
            fl[0] = 0
            chk[T.ramp(0, 1, _L)] = _vec(0.0)
            for j in range(sc):
                for r in T.unroll(r_rows):
                    acc[T.ramp(r * _L, 1, _L)] = _vec(0.0)
                for c in range(d):
                    for r in T.unroll(r_rows):
                        acc[T.ramp(r * _L, 1, _L)] = acc[T.ramp(r * _L, 1, _L)] + T.broadcast(
                            q[task // blocks // h, task // blocks % h, task % blocks * r_rows + r, c], _L) * kt[
                            task // blocks, c, T.ramp(j * _L, 1, _L)]
                for r in T.unroll(r_rows):
                    chk[T.ramp(0, 1, _L)] = chk[T.ramp(0, 1, _L)] + acc[T.ramp(r * _L, 1, _L)]
                    if masked:
                        p[r, T.ramp(j * _L, 1, _L)] = acc[T.ramp(r * _L, 1, _L)] * _vec(scale) + mask[
                            task // blocks // h * sel_b, task // blocks % h * sel_h,
                            (task % blocks * r_rows + r) * sel_q, T.ramp(j * _L, 1, _L)]
                    else:
                        p[r, T.ramp(j * _L, 1, _L)] = acc[T.ramp(r * _L, 1, _L)] * _vec(scale)
            fold_lanes(chk, 0, _L, False)
            if not T.isfinite(chk[0] + chk[1]):  # a raw score not finite (or their sum overflowing: eager's too)
                fl[0] = 1
            for r in T.unroll(r_rows):
                acc[T.ramp(r * _L, 1, _L)] = _vec(-math.inf)
                for j in range(sc):
                    acc[T.ramp(r * _L, 1, _L)] = T.max(acc[T.ramp(r * _L, 1, _L)], p[r, T.ramp(j * _L, 1, _L)])
                fold_lanes(acc, r * _L, _L, True)
                st[r] = T.max(acc[r * _L], acc[r * _L + 1])
                if not T.isfinite(st[r]):  # every key masked, or a mask of +inf
                    fl[0] = 1
                acc[T.ramp(r * _L, 1, _L)] = _vec(0.0)
                for j in range(sc):
                    p[r, T.ramp(j * _L, 1, _L)] = _fast_exp(p[r, T.ramp(j * _L, 1, _L)] - T.broadcast(st[r], _L))
                    acc[T.ramp(r * _L, 1, _L)] = acc[T.ramp(r * _L, 1, _L)] + p[r, T.ramp(j * _L, 1, _L)]
                fold_lanes(acc, r * _L, _L, False)
                st[r_rows + r] = acc[r * _L] + acc[r * _L + 1]
            for r in T.unroll(r_rows):
                for c in T.unroll(dc):
                    o[T.ramp(r * d + c * _L, 1, _L)] = _vec(0.0)
            for t in range(s):
                for r in T.unroll(r_rows):
                    for c in T.unroll(dc):
                        o[T.ramp(r * d + c * _L, 1, _L)] = o[T.ramp(r * d + c * _L, 1, _L)] + T.broadcast(
                            p[r, t], _L) * v[task // blocks // h, task // blocks % h, t, T.ramp(c * _L, 1, _L)]
            chk[T.ramp(0, 1, _L)] = _vec(0.0)
            for r in T.unroll(r_rows):
                for c in T.unroll(dc):
                    out[task // blocks // h, task // blocks % h, task % blocks * r_rows + r, T.ramp(c * _L, 1, _L)] = (
                        o[T.ramp(r * d + c * _L, 1, _L)] / T.broadcast(st[r_rows + r], _L))
                    chk[T.ramp(0, 1, _L)] = chk[T.ramp(0, 1, _L)] + out[
                        task // blocks // h, task // blocks % h, task % blocks * r_rows + r, T.ramp(c * _L, 1, _L)]
            fold_lanes(chk, 0, _L, False)
            if not T.isfinite(chk[0] + chk[1]):
                fl[0] = 1
            bad[task] = fl[0]
        any_bad[0] = 0
        for i in range(b * h * blocks):
            any_bad[0] = T.max(any_bad[0], bad[i])
        if any_bad[0] > 0:  # eager's attention into out (only then a Python call)
            if masked:
                T.evaluate(T.call_packed(MASKED_FALLBACK, q, k, v, mask, out, T.float64(eager_scale),
                                         *[T.int64(x) for x in strides]))
            else:
                T.evaluate(T.call_packed(FALLBACK, q, k, v, out, T.float64(eager_scale),
                                         *[T.int64(x) for x in strides]))

    return f


def convert_attention(bb, node, value_of):
    """Emit an attention node this module computes (``computes``): decode's kernel or prefill's."""
    return (convert_decode_attention if decodes(node) else convert_prefill_attention)(bb, node, value_of)


def convert_prefill_attention(bb, node, value_of):
    """Emit ``node`` into Relax: a bool mask as fp32 0 / -inf (PyTorch's own conversion), then ``R.call_tir`` of
    the prefill kernel (which calls the fallback itself where a block was flagged)."""
    from tvm import relax

    q, k, v = node.args[:3]
    mask = node_arg(node, 3, "attn_mask")
    strides = eager_strides(q, k, v)
    b, h, l, d = q.meta["val"].shape
    s = k.meta["val"].shape[2]
    args = [value_of(q), value_of(k), value_of(v)]
    mask_shape = ()
    if mask is not None:
        mask_shape = tuple(mask.meta["val"].shape)
        m = value_of(mask)
        if mask.meta["val"].dtype == torch.bool:
            m = bb.emit(relax.op.where(m, relax.const(0.0, "float32"), relax.const(-math.inf, "float32")))
        args.append(m)
    else:
        args.append(bb.emit(relax.op.zeros((1, 1, 1, s), "float32")))  # not read: the kernel has no mask then
    eager_scale = node.kwargs.get("scale")
    func = prefill_attention_func(b, h, l, s, d, scale_of(node), mask_shape,
                                  0.0 if eager_scale is None else float(eager_scale),
                                  tuple(strides)).with_attr("tirx.is_scheduled", True)
    name = f"kiln_prefill_attention_b{b}_h{h}_l{l}_s{s}_d{d}{'_masked' if mask_shape else ''}"
    gv = bb.add_func(func.with_attr("global_symbol", name), name)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType([b, h, l, d], "float32")))


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
