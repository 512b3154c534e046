"""PyTorch kernels that TVM-compiled CPU code calls through ``R.call_dps_packed``.

The compiler's library-dispatch stage (``kiln/backends/cpu/dispatch.py``)
emits calls by name; this module registers a function under each name. TVM
passes tensors as ``tvm.runtime.Tensor``; DLPack views them (``_t``)
without a copy (0.5-2.6 us a call), and each function writes its result into
the destination tensor TVM allocated (destination-passing style), with
``out=`` where PyTorch has it and one ``copy_`` where it does not; the
attention (``*_bshd``), oneDNN GEMM (``*_onednn``) and packed-weight GEMM
(``*_mkl_packed``, ``*_onednn_packed``) functions instead return PyTorch's result to TVM.
Scalar attributes arrive as Python ints/floats before the destination.
"""
from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn.functional as F
import tvm

_from_capsule = torch._C._from_dlpack  # what torch.from_dlpack ends in (torch is pinned)


def _t(t) -> torch.Tensor:
    """A torch view of a TVM tensor (CPU, no copy).

    ``torch.from_dlpack`` gets there through device and stream checks in
    Python that cost ~15 us a call inside a model (the cache is cold after
    a GEMM); calling ``__dlpack__`` and the capsule import directly costs a
    fraction, and the library makes ~4 of these per dispatched op.
    """
    return _from_capsule(t.__dlpack__())


def _rows(t: torch.Tensor) -> torch.Tensor:
    # TVM's tensors are contiguous, so folding the leading dims is always a view.
    return t.view(-1, t.shape[-1])


def embedding(w, idx, out):
    w = _t(w)
    torch.index_select(w, 0, _t(idx).reshape(-1), out=_t(out).view(-1, w.shape[1]))


# The calling convention of the functions below (names, argument order). A library
# records the ABI it was built against; the runtime refuses another (tvm_vm.check_compatible).
# 6: bf16 oneDNN linears take their input's non-finite flag (kiln.backends.tvm.finite); linear_bias_gelu_bf16,
# linear_bf16_to_f32. 7: linear_onednn_packed, linear_bias_onednn_packed. 8: sdpa_masked_fallback
ABI = 8


def _gemm(x, w_t, block, out, bias=None):
    """``out = x @ w_t (+ bias)`` with eager's kernel (MKL through ``mm``/``addmm``).

    ``block`` > 0: as calls of ``block`` output columns each (views, no copies).
    Every output element is the same dot product over the same K, so the result
    is bitwise the same; on a wide output (an LM head) the blocks' outputs stay
    in cache. The compiler measures whether that is faster (``tvm/gemm.py``).
    """
    if not block:  # the common case: no slicing (each view costs microseconds)
        if bias is None:
            torch.mm(x, w_t, out=out)
        else:
            torch.addmm(bias, x, w_t, out=out)
        return
    n = out.shape[1]
    for j in range(0, n, block):
        cols = slice(j, min(j + block, n))
        if bias is None:
            torch.mm(x, w_t[:, cols], out=out[:, cols])
        else:
            torch.addmm(bias[..., cols], x, w_t[:, cols], out=out[:, cols])


def _to_tvm(res: torch.Tensor):
    """A PyTorch result handed to TVM by DLPack (TVM's kernels need 64-byte alignment: copied if not)."""
    return tvm.runtime.from_dlpack(res if res.data_ptr() % 64 == 0 else res.clone())


def index_select(x, idx, dim, out):
    torch.index_select(_t(x), dim, _t(idx), out=_t(out))


def gather(x, idx, dim, out):
    torch.gather(_t(x), dim, _t(idx), out=_t(out))


def index(x, dims, *indices_and_out):
    """``x[..., i, ..., j]``: advanced indexing by eager's own op, so negative and out-of-range indices
    behave as in eager (IndexError), which TVM's unchecked ``take`` did not.

    Bit ``d`` of ``dims`` says dimension ``d`` is indexed; its index tensors follow in order, then ``out``.
    """
    *given, out = indices_and_out
    given = iter(given)
    indices = [_t(next(given)) if dims >> d & 1 else None for d in range(dims.bit_length())]
    _t(out).copy_(torch.ops.aten.index.Tensor(_t(x), indices))


# Linears on weights packed once at load (the compiler lists them in the spec: ``packed_bf16_weights``,
# ``packed_f32_weights``, ``packed_onednn_f32_weights``), so no call reorders the plain weight again:
#   bf16: oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``), for any number of rows;
#     1.3-1.6x faster than ``mm``/``addmm`` (measured here, AMX: BERT's 24 GEMMs 8.0 -> 4.9 ms).
#   f32 for MKL: MKL's packed B (``torch.ops.mkl._mkl_reorder_linear_weight``, cblas_sgemm_pack) for one number
#     of rows M, the one the static program runs (a weight two programs use at two M is packed twice); the
#     same sgemm on a pre-packed B, 8-22% faster than ``addmm`` at M=128 on an Intel Xeon
#     (benchmarks/gemm_kernels.py). Resident, it is about the weight's size again (MKL's allocation is larger;
#     the rest is never touched).
#   f32 for oneDNN: oneDNN's blocked layout for the inner product at M rows (``_reorder_linear_weight(w, M)``),
#     the layout its f32 inner product would otherwise reorder the plain weight into on every call: bitwise
#     the plain call's result at M rows, 4-12% faster at M=128 on an AMD EPYC (Zen 5) where oneDNN's f32 GEMMs
#     are 1.7-2.9x MKL's. The weight's size again in memory.
# Keyed by the weight's data pointer, shape, dtype and layout (``_BF16``, ``("mkl", M)``, ``("onednn", M)``),
# each entry holding a weak reference to the tensor that owns the memory (so the address cannot be another
# live tensor's) and its version counter (an in-place change of the weight makes the packed copy stale: the
# plain kernel runs then). oneDNN's bf16 inner product spread a NaN/Inf of input row r+1 into output row r
# (tests/fuzz FINDINGS F2): an input that is not all finite runs the plain kernel there (its f32 one does not:
# tests/backends/test_f32_packed.py).
PACKED_BF16_FUNCTIONS = ("kiln.linear", "kiln.linear_bias", "kiln.linear_onednn", "kiln.linear_bias_onednn",
                         "kiln.linear_bias_gelu_bf16", "kiln.linear_bf16_to_f32")
PACKED_F32_FUNCTIONS = ("kiln.linear_mkl_packed", "kiln.linear_bias_mkl_packed")
PACKED_ONEDNN_F32_FUNCTIONS = ("kiln.linear_onednn_packed", "kiln.linear_bias_onednn_packed")
_BF16 = "onednn-bf16"
_PACKED: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}
_pack_lock = threading.Lock()


def _packable(w: torch.Tensor, dtype: torch.dtype) -> bool:
    return (w.dtype == dtype and w.dim() == 2 and w.is_contiguous() and w.device.type == "cpu" and w.numel() > 0
            and not w.is_inference())


def _pack(pairs, pack) -> int:
    """Pack each ``(weight, layout)`` with ``pack(weight, layout)`` unless it is packed already; how many are
    packed."""
    count = 0
    with _pack_lock:
        for w, layout in pairs:
            key = (w.data_ptr(), tuple(w.shape), w.dtype, layout)
            if _packed(w, layout) is None:
                def forget(ref, key=key):
                    if _PACKED.get(key, (None,))[0] is ref:
                        _PACKED.pop(key, None)
                _PACKED[key] = (weakref.ref(w, forget), w._version, pack(w, layout))
            count += 1
    return count


def pack_bf16_weights(weights) -> int:
    """Pack each bf16 ``[N, K]`` weight once for the bf16 linears (a copy as large as the weight, living as long
    as it); returns how many are packed. Thread-safe; weights already packed are skipped."""
    if not torch.backends.mkldnn.is_available():
        return 0
    return _pack(((w, _BF16) for w in weights if _packable(w, torch.bfloat16)),
                 lambda w, layout: torch.ops.mkldnn._reorder_linear_weight(w, None))


def _pack_f32_at_rows(weights_and_rows, library: str, reorder) -> int:
    """Pack each f32 weight of the pairs ``(weight, M)`` with ``reorder(weight, M)``, keyed ``(library, M)``."""
    return _pack(((w, (library, int(m))) for w, m in weights_and_rows if _packable(w, torch.float32) and m >= 1),
                 lambda w, layout: reorder(w, layout[1]))


def pack_f32_weights(weights_and_rows) -> int:
    """Pack each f32 ``[N, K]`` weight for MKL's sgemm at its number of rows ``M`` (pairs ``(weight, M)``), once;
    returns how many are packed. Thread-safe; without MKL nothing is packed (the linears run ``addmm``)."""
    if not torch.backends.mkl.is_available():
        return 0
    return _pack_f32_at_rows(weights_and_rows, "mkl", torch.ops.mkl._mkl_reorder_linear_weight)


def pack_onednn_f32_weights(weights_and_rows) -> int:
    """Pack each f32 ``[N, K]`` weight into oneDNN's blocked layout for its inner product at ``M`` rows (pairs
    ``(weight, M)``), once; returns how many are packed. Thread-safe; without oneDNN nothing is packed (the
    linears run oneDNN on the plain weight)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    return _pack_f32_at_rows(weights_and_rows, "onednn", torch.ops.mkldnn._reorder_linear_weight)


# The f32 packings by the spec field that lists their ``[weight, rows]``: the runtime functions that read the
# packed copy (the compiler lists a weight when a planned call of one of them takes it) and the function that
# packs (the loader calls it).
F32_PACKINGS = {"packed_f32_weights": (PACKED_F32_FUNCTIONS, pack_f32_weights),
                "packed_onednn_f32_weights": (PACKED_ONEDNN_F32_FUNCTIONS, pack_onednn_f32_weights)}


def _packed(w: torch.Tensor, layout):
    """The packed copy of the weight ``w`` views in ``layout`` (``_BF16``, ``("mkl", M)`` or ``("onednn", M)``),
    if one was packed and its owner is alive and unmodified."""
    entry = _PACKED.get((w.data_ptr(), tuple(w.shape), w.dtype, layout))
    if entry is None:
        return None
    owner = entry[0]()
    if owner is None or owner._version != entry[1] or owner.data_ptr() != w.data_ptr():
        return None
    return entry[2]


def _finite(x: torch.Tensor) -> bool:
    # bf16's own sum (fp32 accumulation inside, half the time of sum(dtype=float32)); a sum of finite
    # values overflowing only sends the call to the plain kernel, still right
    return math.isfinite(_sum(x))


def _linear(x, w, b, block, out):
    x, w, out = _t(x), _t(w), _t(out)
    if x.dtype == torch.bfloat16 and x.numel() > 0:
        packed = _packed(w, _BF16)
        if packed is not None and _finite(x):
            res = torch.ops.mkldnn._linear_pointwise(_rows(x), packed, b, "none", [], "")
            _rows(out).copy_(res)
            return
    _gemm(_rows(x), w.t(), block, _rows(out), b)


def linear(x, w, block, out):
    _linear(x, w, None, block, out)


def linear_bias(x, w, b, block, out):
    _linear(x, w, _t(b), block, out)


def addmm(b, x, w, block, out):
    _gemm(_t(x), _t(w), block, _t(out), _t(b))


# oneDNN's inner product (what inductor's CPU freezing path calls): another
# accumulation order than MKL's sgemm, so not bitwise eager's result, and on
# this Zen CPU up to 1.9x faster on wide or single-row GEMMs. It has no
# ``out=``: the result tensor itself goes back to TVM.
def _onednn(x, w, b=None):
    return _to_tvm(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))


def _eager_linear(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``rows @ w.T (+ b)`` on eager's kernel (MKL through ``mm``/``addmm``), as a new tensor."""
    return torch.mm(rows, w.t()) if b is None else torch.addmm(b, rows, w.t())


def _takes_eager(x: torch.Tensor, nonfinite) -> bool:
    """Whether a bf16 linear on ``x`` must run eager's kernel instead of oneDNN's (which spreads a NaN into the
    row before: F2): ``x`` is empty or not all finite. ``nonfinite``: the input's flag from the library's own
    kernel (``int32[1]``, 1: a NaN or inf somewhere), which compiled bf16 linears pass; without it ``x`` is
    summed here."""
    return x.numel() == 0 or (not _finite(x) if nonfinite is None else bool(_t(nonfinite)[0]))


def _bf16_linear(x, w, b, nonfinite) -> torch.Tensor:
    """``x @ w.T (+ b)`` in bf16: oneDNN on the packed weight when there is one, eager's kernel
    (``mm``/``addmm``) where ``_takes_eager``."""
    rows = _rows(x)
    if _takes_eager(x, nonfinite):
        res = _eager_linear(rows, w, b)
    else:
        packed = _packed(w, _BF16)
        res = torch.ops.mkldnn._linear_pointwise(rows, w if packed is None else packed, b, "none", [], "")
    return res.view(*x.shape[:-1], w.shape[0])


def _linear_onednn(x, w, b=None, nonfinite=None):
    """A linear on oneDNN, returned to TVM: bf16 as ``_bf16_linear``; f32 on the plain weight."""
    if x.dtype == torch.bfloat16:
        return _to_tvm(_bf16_linear(x, w, b, nonfinite))
    return _onednn(x, w, b)


def linear_bias_gelu_bf16(x, w, b, tanh, nonfinite):
    """``gelu(x @ w.T + b)`` in bf16 (erf, or ``tanh`` 1: PyTorch's ``approximate="tanh"``) as one oneDNN inner
    product that applies the GELU to the fp32 accumulator and rounds once, on the weight packed at load. Where
    ``_takes_eager`` (or no weight was packed) it runs what the graph said instead, on eager's kernels: the
    bf16 linear, then the GELU in fp32, rounded to bf16."""
    x, w, b = _t(x), _t(w), _t(b)
    rows = _rows(x)
    packed = _packed(w, _BF16)
    if packed is None or _takes_eager(x, nonfinite):
        approximate = "tanh" if tanh else "none"
        res = torch.nn.functional.gelu(_eager_linear(rows, w, b).float(), approximate=approximate).bfloat16()
    else:
        res = torch.ops.mkldnn._linear_pointwise(rows, packed, b, "gelu", [], "tanh" if tanh else "none")
    return _to_tvm(res.view(*x.shape[:-1], w.shape[0]))


def linear_bf16_to_f32(x, w, *rest):
    """``out = float(x @ w.T (+ b))``: the bf16 linear (``_bf16_linear``), then its conversion into the fp32
    ``out`` on PyTorch's threads. ``rest``: ``(b,) nonfinite, out``."""
    *bias, nonfinite, out = rest
    _t(out).copy_(_bf16_linear(_t(x), _t(w), _t(bias[0]) if bias else None, nonfinite))


def linear_onednn(x, w, nonfinite=None):
    return _linear_onednn(_t(x), _t(w), None, nonfinite)


def linear_bias_onednn(x, w, b, nonfinite=None):
    return _linear_onednn(_t(x), _t(w), _t(b), nonfinite)


def addmm_onednn(b, x, w):
    return _onednn(_t(x), _t(w).t(), _t(b))  # w is [K, N]: its transpose is the [N, K] weight (a view)


def _linear_mkl_packed(x, w, b=None):
    """A f32 linear on its MKL-packed weight for this many rows (``pack_f32_weights``), returned to TVM; when there
    is none (a weight changed in place since loading, or no MKL), eager's ``mm``/``addmm``."""
    rows = _rows(x)
    packed = _packed(w, ("mkl", rows.shape[0]))
    if packed is not None:
        res = torch.ops.mkl._mkl_linear(rows, packed, w, b, rows.shape[0])
    else:
        res = _eager_linear(rows, w, b)
    return _to_tvm(res.view(*x.shape[:-1], w.shape[0]))


def linear_mkl_packed(x, w):
    return _linear_mkl_packed(_t(x), _t(w))


def linear_bias_mkl_packed(x, w, b):
    return _linear_mkl_packed(_t(x), _t(w), _t(b))


def _linear_onednn_packed(x, w, b=None):
    """A f32 linear on oneDNN with its weight packed for this many rows (``pack_onednn_f32_weights``), returned to
    TVM; when there is none (a weight changed in place since loading, or no oneDNN), oneDNN on the plain weight:
    the same result."""
    rows = _rows(x)
    packed = _packed(w, ("onednn", rows.shape[0]))
    res = torch.ops.mkldnn._linear_pointwise(rows, w if packed is None else packed, b, "none", [], "")
    return _to_tvm(res.view(*x.shape[:-1], w.shape[0]))


def linear_onednn_packed(x, w):
    return _linear_onednn_packed(_t(x), _t(w))


def linear_bias_onednn_packed(x, w, b):
    return _linear_onednn_packed(_t(x), _t(w), _t(b))


def mm(a, b, out):
    torch.mm(_t(a), _t(b), out=_t(out))


def bmm(a, b, out):
    torch.bmm(_t(a), _t(b), out=_t(out))


def matmul(a, b, out):
    torch.matmul(_t(a), _t(b), out=_t(out))


def _sum(x: torch.Tensor) -> float:
    """``x``'s sum as a Python float, accumulated in fp32 at least (bf16's own sum does: 2x faster than
    ``dtype=float32``); ``.item()``: a third of ``torch.isfinite``'s time on a 0-d tensor."""
    return (x.sum() if x.dtype in (torch.float32, torch.float64, torch.bfloat16)
            else x.sum(dtype=torch.float32)).item()


def _laid_out(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor | None:
    """``x``'s values in a tensor with strides ``stride`` (a dimension of stride 0 expanded from one slice), or
    None when that layout overlaps itself in another way (no tensor can be written so)."""
    if tuple(x.stride()) == stride:
        return x
    base = [1 if s == 0 else n for n, s in zip(x.shape, stride)]
    dims = sorted((s, n) for n, s in zip(base, stride) if n > 1)
    if any(s2 < s1 * n1 for (s1, n1), (s2, _) in zip(dims, dims[1:])):
        return None
    size = 1 + sum((n - 1) * s for n, s in zip(base, stride))
    out = torch.empty(size, dtype=x.dtype).as_strided(base, stride)
    out.copy_(x[tuple(slice(0, 1) if s == 0 else slice(None) for s in stride)])
    return out.expand(x.shape)


def _attention(q, k, v, mask, causal, scale, gqa, strides):
    """PyTorch's attention, called as eager calls it.

    With a NaN or inf in q, k or v, PyTorch's fused CPU kernel gives results that depend on its inputs'
    layout (it drops NaN from some rows of contiguous inputs where a strided view keeps it, fuzz seed 9800272;
    it gives 0 where the math path gives NaN for others, seed 9980011), so there q, k and v are first laid out
    with the strides eager's had (``strides``: ``[ndim, *q, *k, *v]``, from the traced values), which gives
    eager's result; a layout no tensor can be written in runs the math path. The check is one sum per input:
    a NaN or inf makes it non-finite (a finite sum overflowing only costs a copy). Inputs that already have
    eager's strides skip it: the fused kernel on them is what eager ran (a decode step's q/k/v, where the sums
    cost more than the attention)."""
    kwargs = dict(attn_mask=mask, is_causal=bool(causal), scale=scale or None, enable_gqa=bool(gqa))
    nd = strides[0]
    eager = [tuple(strides[1 + i * nd:1 + (i + 1) * nd]) for i in range(3)]
    if any(tuple(x.stride()) != s for x, s in zip((q, k, v), eager)) and not math.isfinite(
            _sum(q) + _sum(k) + _sum(v)):
        laid = [_laid_out(x, s) for x, s in zip((q, k, v), eager)]
        if any(x is None for x in laid):
            return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, **kwargs)[0]
        q, k, v = laid
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _sdpa(q, k, v, mask, causal, scale, gqa, rest):
    *strides, out = rest
    _t(out).copy_(_attention(_t(q), _t(k), _t(v), mask, causal, scale, gqa, strides))


# The attention functions' trailing arguments: eager's strides of q, k and v (``[ndim, *q, *k, *v]``, see
# ``_attention``), then the destination (where the function writes one).
def sdpa(q, k, v, causal, scale, gqa, *rest):
    _sdpa(q, k, v, None, causal, scale, gqa, rest)


def sdpa_mask(q, k, v, mask, causal, scale, gqa, *rest):
    _sdpa(q, k, v, _t(mask), causal, scale, gqa, rest)


def _sdpa_bshd(q, k, v, mask, causal, scale, gqa, layout, strides):
    # Bit i of ``layout``: q/k/v (i = 0/1/2) is given [B, S, H, D]; view it [B, H, S, D] (no copy).
    q, k, v = (_t(x).transpose(1, 2) if layout >> i & 1 else _t(x) for i, x in enumerate((q, k, v)))
    res = _attention(q, k, v, mask, causal, scale, gqa, strides)
    # Returned [B, S, H, D]: PyTorch's CPU attention already lays its output out so (a view,
    # no copy); TVM takes the tensor itself.
    return _to_tvm(res.transpose(1, 2).contiguous())


def sdpa_bshd(q, k, v, causal, scale, gqa, layout, *strides):
    return _sdpa_bshd(q, k, v, None, causal, scale, gqa, layout, strides)


def sdpa_mask_bshd(q, k, v, mask, causal, scale, gqa, layout, *strides):
    mask = _t(mask)
    # A padding mask with no padding (HF encoders given all-ones attention masks) masks
    # nothing: eager HF then passes no mask at all; checking costs ~6 us, masking ~50 us.
    if mask.dtype == torch.bool and mask.numpy().all():
        mask = None
    return _sdpa_bshd(q, k, v, mask, causal, scale, gqa, layout, strides)


def sdpa_decode_fallback(q, k, v, out, scale, *strides):
    """Eager's attention into ``out``, called by the cpu target's decode attention kernel
    (``kiln.backends.cpu.attention``) when an input or a score of the call is not finite. A kernel's
    ``T.call_packed`` passes its buffers as bare DLTensor views (DLPack export of them crashes): read by copy
    (a rare path), written with ``copyfrom``."""
    q, k, v = (torch.from_numpy(x.numpy()) for x in (q, k, v))
    out.copyfrom(_attention(q, k, v, None, 0, scale, 0, strides).contiguous().numpy())


def sdpa_masked_fallback(q, k, v, mask, out, scale, *strides):
    """``sdpa_decode_fallback`` with an fp32 additive mask: called by the cpu target's prefill attention kernel."""
    q, k, v, mask = (torch.from_numpy(x.numpy()) for x in (q, k, v, mask))
    out.copyfrom(_attention(q, k, v, mask, 0, scale, 0, strides).contiguous().numpy())


def conv2d(x, w, s0, s1, p0, p1, d0, d1, groups, out):
    _t(out).copy_(F.conv2d(_t(x), _t(w), None, (s0, s1), (p0, p1), (d0, d1), groups))


def conv2d_bias(x, w, b, s0, s1, p0, p1, d0, d1, groups, out):
    _t(out).copy_(F.conv2d(_t(x), _t(w), _t(b), (s0, s1), (p0, p1), (d0, d1), groups))


FUNCTIONS = {f"kiln.{f.__name__}": f for f in (
    embedding, index_select, gather, index,
    linear, linear_bias, addmm, linear_onednn, linear_bias_onednn, addmm_onednn,
    linear_mkl_packed, linear_bias_mkl_packed, linear_onednn_packed, linear_bias_onednn_packed,
    linear_bias_gelu_bf16, linear_bf16_to_f32,
    mm, bmm, matmul,
    sdpa, sdpa_mask, sdpa_bshd, sdpa_mask_bshd, sdpa_decode_fallback, sdpa_masked_fallback,
    conv2d, conv2d_bias)}


_register_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register every function with TVM, once a process (needed before a VM that calls them runs).

    Once, not at every load: TVM's global function table has no lock, and a
    thread making its VM (which looks these names up) while another thread
    loads a model would read the table while it is rewritten.
    """
    global _registered
    with _register_lock:  # a second loading thread waits until the first has registered them all
        if not _registered:
            for name, fn in FUNCTIONS.items():
                tvm.register_global_func(name, fn, override=True)
            _registered = True
