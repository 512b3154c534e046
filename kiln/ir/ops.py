"""kiln's own ``torch.library`` ops (namespace ``kiln``), usable without the compiler.

An op here is a real PyTorch op: a schema, a CPU kernel (the code below, on
PyTorch's own kernels) and a fake kernel for tracing. Graphs call them like any
ATen op: the verifier, the JSON serializer (``kiln.ir.serialize``) and the
``torch`` backend admit exactly the ops in :data:`OPS` (a ``kiln::`` op
registered by anyone else is refused). The runtime imports this module (through
``kiln.ir.serialize``) before it resolves a graph's ops, so it must not import
the compiler (``kiln.passes``, ``kiln.backends``) or transformers.

``kiln::moe_experts``: a mixture-of-experts FFN's experts, given the router's
choice. Tokens are grouped by expert (a stable sort of the flattened
``top_k_index``), each expert runs two GEMMs on its contiguous slice of rows
(gate/up projection, ``act(gate) * up``, down projection), each row is scaled
by its routing weight, rows go back to token order and each token's ``k`` rows
are summed in order: the op order of transformers' default
(``grouped_mm``) experts implementation, so the result is within fp32
rounding of eager's (bitwise, where eager's ``F.grouped_mm`` runs the same
MKL GEMMs). Attention/FFN disaggregation will dispatch this op M->N.

The ``cpu`` target runs it on the ``torch`` backend (the TVM converter has no
rule for it, so placement falls back): PyTorch's GEMMs, as eager. Measured on
a 512-wide Mixtral layer (one thread), a ``torch`` task between two TVM tasks
costs under 0.1 ms against ~10 ms for the experts themselves, so a
library-dispatch rule (a call from inside the TVM library) would gain nothing
measurable and would tie the op to the dispatch ABI.

``kiln::grouped_mm`` is ``transformers::grouped_mm_fallback`` under kiln's
name, for experts modules that ``kiln.ir.moe`` does not recognise.

``kiln::nested_linear``: a linear layer over one view (8, 4 or 2 bits) of a
nested weight (``kiln.ir.nested``), the op the ``quantize_nested`` pass writes.

``kiln::int8_linear``: a linear layer as a mobile NPU runs it (mllm-NPU, QNN's
w8a8): the activation quantized per tensor with one static scale (clipped to
``[-127, 127]``: values beyond ``127 * x_scale`` saturate), an int8 x int8
matrix product accumulated exactly in int32 (``torch._int_mm``), then scaled
back by ``x_scale * weight_scale[n]`` in float32. The integer part is exact,
so every kernel of this op gives bitwise the same result. The ``npu`` backend
runs it; ``ExtractOutliers`` computes the clipped channels beside it in float.
Its CPU kernel has two paths, bitwise equal: :func:`int8_linear_reference`
(``torch._int_mm``) and, for a weight prepacked once with
:func:`prepack_int8_linear_weight` (the npu loader does it for the weights it
binds), oneDNN's int8 matmul on the packed weight where the CPU has VNNI/AMX
(``benchmarks/int8_linear_kernels.py``, one thread: ~1.7x the former kernel
at 64x768x3072, ~2x on a 768x32000 LM head, even at the smallest shapes).
"""
from __future__ import annotations

import os
import threading
import weakref

import torch
import torch.nn.functional as F

from .nested import BLOCK, PLANES_OF, dequantize

# The activations ``moe_experts`` takes, by name (the gate half goes through it).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

_lib = torch.library.Library("kiln", "DEF")  # kiln's own namespace: defined once, here

_lib.define(
    "moe_experts(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up_proj, "
    "Tensor down_proj, str activation, bool transposed) -> Tensor")


def _check(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, transposed):
    torch._check(hidden.dim() == 2, lambda: f"moe_experts: hidden must be 2-D (tokens, hidden), got {hidden.dim()}-D")
    torch._check(top_k_index.dim() == 2 and top_k_index.shape == top_k_weights.shape,
                 lambda: "moe_experts: top_k_index and top_k_weights must be (tokens, k) of one shape")
    torch._check(not top_k_index.is_floating_point(), lambda: "moe_experts: top_k_index must be an integer tensor")
    torch._check(gate_up_proj.dim() == 3 and down_proj.dim() == 3 and gate_up_proj.shape[0] == down_proj.shape[0],
                 lambda: "moe_experts: gate_up_proj and down_proj must be (experts, ., .) of one expert count")
    torch._check(activation in ACTIVATIONS, lambda: f"moe_experts: unknown activation {activation!r}")
    h_dim = gate_up_proj.shape[1] if transposed else gate_up_proj.shape[2]
    torch._check(hidden.shape[1] == h_dim, lambda: "moe_experts: hidden width does not match gate_up_proj")


def moe_experts_reference(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation="silu",
                          transposed=False):
    """The same computation one (token, slot) pair at a time: the definition, for tests."""
    act = ACTIVATIONS[activation]
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            w1, w2 = gate_up_proj[e], down_proj[e]
            h = hidden[t] @ w1 if transposed else w1 @ hidden[t]
            gate, up = h.chunk(2)
            h = act(gate) * up
            out[t] += (h @ w2 if transposed else w2 @ h) * top_k_weights[t, j]
    return out


def moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, transposed):
    _check(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, transposed)
    act = ACTIVATIONS[activation]
    tokens, k = top_k_index.shape
    n_experts = gate_up_proj.shape[0]
    ids = top_k_index.reshape(-1)
    # Eager's index checks: an expert id out of range is an error, not a read past the weights.
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        raise IndexError(f"moe_experts: expert index out of range [0, {n_experts})")
    order = torch.sort(ids, stable=True).indices
    counts = torch.bincount(ids, minlength=n_experts).tolist()
    # (tokens * k, hidden) grouped by expert, in the weights' dtype (as transformers casts it)
    rows = hidden.index_select(0, order // k).to(gate_up_proj.dtype)
    weights = top_k_weights.reshape(-1).index_select(0, order)
    out_dim = down_proj.shape[2] if transposed else down_proj.shape[1]
    grouped = torch.empty(rows.shape[0], out_dim, dtype=down_proj.dtype, device=hidden.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        x = rows[start:start + n]
        w1, w2 = gate_up_proj[e], down_proj[e]
        h = torch.mm(x, w1) if transposed else F.linear(x, w1)
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
        if transposed:
            torch.mm(h, w2, out=grouped[start:start + n])
        else:
            torch.mm(h, w2.t(), out=grouped[start:start + n])
        start += n
    # Scaled and summed in the promoted dtype (bf16 experts, fp32 routing weights: fp32), as in
    # transformers, then back to the input's dtype.
    weighted = grouped * weights.unsqueeze(-1)
    unsorted = torch.empty_like(weighted)
    unsorted[order] = weighted
    return unsorted.view(tokens, k, out_dim).sum(dim=1).to(hidden.dtype)


_lib.impl("moe_experts", moe_experts, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::moe_experts", lib=_lib)
def _moe_experts_fake(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, transposed):
    _check(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, transposed)
    out_dim = down_proj.shape[2] if transposed else down_proj.shape[1]
    return hidden.new_empty(hidden.shape[0], out_dim)


# ``kiln::grouped_mm``: ``transformers::grouped_mm_fallback`` (same schema and result) for
# experts modules ``kiln.ir.moe`` does not recognise: rows ``offs[i-1]:offs[i]`` of ``input``
# times ``weight[i]``; rows past ``offs[-1]`` are zero.
_lib.define("grouped_mm(Tensor input, Tensor weight, Tensor offs) -> Tensor")


def grouped_mm(input, weight, offs):
    torch._check(input.dim() == 2 and weight.dim() == 3 and offs.dim() == 1 and offs.shape[0] == weight.shape[0]
                 and input.shape[1] == weight.shape[1], lambda: "grouped_mm: input (S, K), weight (G, K, N), offs (G,)")
    out = input.new_zeros(input.shape[0], weight.shape[2])
    start = 0
    for i, end in enumerate(offs.tolist()):
        if not start <= end <= input.shape[0]:
            raise IndexError(f"grouped_mm: offsets must be non-decreasing and at most {input.shape[0]}")
        if end > start:
            torch.mm(input[start:end], weight[i], out=out[start:end])
        start = end
    return out


_lib.impl("grouped_mm", grouped_mm, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::grouped_mm", lib=_lib)
def _grouped_mm_fake(input, weight, offs):
    return input.new_empty(input.shape[0], weight.shape[2])


# ``kiln::nested_linear``: ``x @ W_b^T + bias`` with ``W_b`` the ``bits``-bit view of a nested weight
# (kiln.ir.nested: bit planes hi / mid / lo, the view's step ``scale`` and the shared ``zero``; a view
# passes only the planes it reads, the others as None). This kernel dequantizes the view in float32 and
# runs one GEMM: the reference every faster kernel of the op is checked against.
_lib.define("nested_linear(Tensor x, Tensor hi, Tensor? mid, Tensor? lo, Tensor scale, Tensor zero, Tensor? bias, "
            "int bits, int group_size) -> Tensor")


def _check_nested(x, hi, mid, lo, scale, zero, bias, bits, group_size):
    torch._check(bits in PLANES_OF, lambda: f"nested_linear: bits must be one of {sorted(PLANES_OF)}, not {bits}")
    given = {"hi": hi, "mid": mid, "lo": lo}
    wanted = PLANES_OF[bits]
    torch._check(all((given[p] is not None) == (p in wanted) for p in given),
                 lambda: f"nested_linear: the {bits}-bit view reads the planes {wanted}, and only those")
    n, k = hi.shape[0], hi.shape[1] * 4
    torch._check(x.shape[-1] == k, lambda: f"nested_linear: x has {x.shape[-1]} features, the weight {k}")
    torch._check(group_size % BLOCK == 0 and k % group_size == 0 and tuple(scale.shape) == (n, k // group_size)
                 and scale.shape == zero.shape, lambda: "nested_linear: scale and zero are [N, K / group_size]")
    torch._check(bias is None or tuple(bias.shape) == (n,), lambda: f"nested_linear: bias must be [{n}]")


def nested_linear(x, hi, mid, lo, scale, zero, bias, bits, group_size):
    _check_nested(x, hi, mid, lo, scale, zero, bias, bits, group_size)
    planes = {name: t for name, t in (("hi", hi), ("mid", mid), ("lo", lo)) if t is not None}
    weight = dequantize(planes, scale, zero, bits, group_size)
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


_lib.impl("nested_linear", nested_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::nested_linear", lib=_lib)
def _nested_linear_fake(x, hi, mid, lo, scale, zero, bias, bits, group_size):
    _check_nested(x, hi, mid, lo, scale, zero, bias, bits, group_size)
    return x.new_empty(*x.shape[:-1], hi.shape[0])


# ``kiln::int8_linear``: ``dequant(int8(clip(x / x_scale)) @ weight^T) + bias`` (see the module docstring).
# ``weight`` is int8 ``[N, K]`` (symmetric, per output channel), ``weight_scale`` float32 ``[N]``.
_lib.define("int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, float x_scale) -> Tensor")


def _check_int8(x, weight, weight_scale, bias, x_scale):
    torch._check(weight.dtype == torch.int8 and weight.dim() == 2,
                 lambda: f"int8_linear: weight must be int8 [N, K], not {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    torch._check(x.dtype.is_floating_point and x.shape[-1] == k,
                 lambda: f"int8_linear: x must be floating point with {k} features, not {x.dtype} {list(x.shape)}")
    torch._check(weight_scale.dtype == torch.float32 and tuple(weight_scale.shape) == (n,),
                 lambda: f"int8_linear: weight_scale must be float32 [{n}]")
    torch._check(bias is None or tuple(bias.shape) == (n,), lambda: f"int8_linear: bias must be [{n}]")
    torch._check(x_scale > 0 and x_scale != float("inf"), lambda: f"int8_linear: x_scale must be > 0 and finite, "
                 f"not {x_scale}")


def quantize_activation(x: torch.Tensor, x_scale: float) -> torch.Tensor:
    """``x`` as int8 codes of step ``x_scale``: rounded half to even, saturated to ``[-127, 127]``."""
    steps = x.float() / x_scale  # a new tensor: rounded and clamped in place (the same operations, fewer buffers)
    return steps.round_().clamp_(-127, 127).to(torch.int8)


_SCRATCH = threading.local()  # per thread: float32 and int8 buffers the prepacked kernel quantizes into
# Where the scratch buffers pay (measured, one thread): from ~1 MiB of float32 (below, fresh buffers
# cost less than the bookkeeping), up to 20 MiB of buffers per thread (beyond, fresh ones).
_SCRATCH_MIN, _SCRATCH_MAX = 1 << 18, 1 << 22


def _quantize_rows_into_scratch(rows: torch.Tensor, x_scale: float) -> torch.Tensor:
    """:func:`quantize_activation` of the 2-D ``rows``, the same operations in the same order, into this
    thread's scratch buffers (fresh buffers cost page faults: ~2.5x the time of the arithmetic at 128x3072).
    The codes are valid until this thread's next call: only for the matmul that consumes them at once."""
    n = rows.numel()
    if not _SCRATCH_MIN <= n <= _SCRATCH_MAX:
        return quantize_activation(rows, x_scale).contiguous()
    floats, codes = getattr(_SCRATCH, "floats", None), getattr(_SCRATCH, "codes", None)
    if floats is None or floats.numel() < n:
        floats, codes = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.int8)
        _SCRATCH.floats, _SCRATCH.codes = floats, codes
    t = floats[:n].view(rows.shape)
    torch.div(rows.float(), x_scale, out=t)
    t.round_()
    t.clamp_(-127, 127)
    return codes[:n].view(rows.shape).copy_(t)


def _int_mm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int8 ``[M, K]`` and ``[K, N]``, exact in int32: ``torch._int_mm``, except for K == 1, where
    torch's CPU ``_int_mm`` returns uninitialized memory when N > 1 (torch 2.13): there the outer product."""
    if a.shape[1] == 1:
        return a.to(torch.int32) * b.to(torch.int32)
    return torch._int_mm(a, b)


def int8_linear_reference(x, weight, weight_scale, bias, x_scale):
    """``kiln::int8_linear`` as its contract states it, on ``torch._int_mm``: what every kernel of it must equal, bitwise."""
    _check_int8(x, weight, weight_scale, bias, x_scale)
    rows = x.reshape(-1, x.shape[-1])
    acc = _int_mm_exact(quantize_activation(rows, x_scale), weight.t())  # exact int32 accumulation
    out = acc.to(torch.float32).mul_(weight_scale * x_scale)  # a new tensor, scaled and biased in place
    if bias is not None:
        out.add_(bias.float())
    return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


# The prepacked kernel: oneDNN's int8 matmul (``onednn::qlinear_pointwise``, inductor's x86 int8
# linear) on a weight reordered once into oneDNN's blocked layout (``onednn::qlinear_prepack``;
# ~10 ms for 768x3072, ~100 ms for 768x32000 on one thread, so it is done when a loader binds a
# weight, :func:`prepack_int8_linear_weight`, never per call). Why it is bitwise the reference:
# - the int32 accumulators are exact where oneDNN multiplies s8 x s8 with VNNI (``vpdpbusd``,
#   its s8 -> u8 shift compensated in int32) or AMX tiles. Without VNNI it uses ``vpmaddubsw``,
#   which saturates in int16 (oneDNN then halves the weights): not exact, so there the reference
#   runs. K is bounded so that the shifted sums cannot overflow int32 (255 * 127 * K < 2**31).
# - it is called with activation scale 1.0 and zero point 0 (torch then sets no source scale),
#   output scale 1.0 (no destination scale), float32 output, no bias, and as weight scales the
#   float32 vector ``weight_scale * x_scale`` computed as the reference computes it. oneDNN's
#   result is then ``float(acc) * scale[n]``: one int32 -> float32 conversion (round to nearest
#   even, as ``acc.to(float32)``) and one float32 multiply, the reference's two steps (any factor
#   1.0 it multiplies by is exact).
# - the bias is added afterwards, in place (``out.add_(bias.float())``: the reference's ``+``, the
#   same float32 rounding; oneDNN's own bias could be fused into a multiply-add, one rounding).
_PACK_MAX_K = 65536
# id(weight) -> (weakref to weight, its version, its data pointer, packed weight, zero points). Read
# without a lock (a dict lookup is atomic); written under _PACK_LOCK; an entry leaves with its weight.
_PACKED: dict[int, tuple] = {}
_PACK_LOCK = threading.Lock()
_onednn_exact: bool | None = None


def _onednn_int8_is_exact() -> bool:
    """Whether this CPU and torch build run oneDNN's s8 x s8 matmul with exact int32 accumulation: VNNI
    in the CPU, not masked off by ``ONEDNN_MAX_CPU_ISA`` (with ``AVX2`` its s8 x s8 results are off by
    millions), and a saturating test product computed exactly (checked once per process)."""
    global _onednn_exact
    if _onednn_exact is None:
        isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
        try:
            _onednn_exact = bool(torch.backends.mkldnn.is_available() and torch.cpu._is_vnni_supported()
                                 and any(part in isa for part in ("ALL", "VNNI", "AMX", "BF16", "FP16", "AVX10"))
                                 and _onednn_int8_self_test())
        except (AttributeError, RuntimeError):
            _onednn_exact = False
    return _onednn_exact


def _onednn_int8_self_test() -> bool:
    """oneDNN's prepacked s8 x s8 product against exact int64 arithmetic, on the codes that saturate a
    16-bit multiply-add (+-127 activations, 127 / -128 weights) and on random ones, at M = 1 and M = 5."""
    g = torch.Generator().manual_seed(0)
    k, n = 320, 48
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w[0], w[1] = 127, -128
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    for m in (1, 5):
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        x[0] = 127
        if m > 1:
            x[1] = -127
        out = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.int64),
                                                 None, 1.0, 0, torch.float32, "none", [], "")
        if not torch.equal(out, (x.long() @ w.long().t()).float()):  # |sums| < 2**24: exact in float32
            return False
    return True


def _packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.int8 and weight.dim() == 2
            and weight.layout == torch.strided and weight.is_contiguous() and not weight.is_inference()
            and not weight.requires_grad and 0 < weight.shape[1] <= _PACK_MAX_K and weight.shape[0] > 0
            and not isinstance(weight, torch._subclasses.FakeTensor))


def prepack_int8_linear_weight(weight: torch.Tensor) -> bool:
    """Prepack ``weight`` (int8 ``[N, K]``) once for ``kiln::int8_linear``'s oneDNN kernel; thread-safe.

    Later calls of the op with this very tensor (same object, unmodified: its version counter and
    data pointer are checked on every call) run the prepacked kernel, bitwise equal to
    :func:`int8_linear_reference`. The packed copy (as large as the weight) lives as long as the
    weight. Returns whether the prepacked kernel will run for it (False where this CPU lacks VNNI,
    or the weight is not a plain contiguous CPU int8 tensor: the reference runs).
    """
    if not (_onednn_int8_is_exact() and _packable(weight)):
        return False
    with _PACK_LOCK:
        if _packed_entry(weight) is None:
            key = id(weight)

            def forget(ref, key=key):
                if _PACKED.get(key, (None,))[0] is ref:
                    _PACKED.pop(key, None)

            _PACKED[key] = (weakref.ref(weight, forget), weight._version, weight.data_ptr(),
                            torch.ops.onednn.qlinear_prepack(weight, None),
                            torch.zeros(weight.shape[0], dtype=torch.int64))
    return True


def _packed_entry(weight: torch.Tensor):
    """The prepacked state of ``weight`` if it is current (this very tensor, unmodified since), else None."""
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0]() is not weight or weight.is_inference() \
            or entry[1] != weight._version or entry[2] != weight.data_ptr():
        return None
    return entry


def int8_linear(x, weight, weight_scale, bias, x_scale):
    """``kiln::int8_linear``'s CPU kernel: the prepacked oneDNN kernel for a weight prepacked by
    :func:`prepack_int8_linear_weight`, else the reference; bitwise the same either way."""
    _check_int8(x, weight, weight_scale, bias, x_scale)
    entry = _packed_entry(weight) if x.device.type == "cpu" and x.numel() > 0 else None
    if entry is None:
        return int8_linear_reference(x, weight, weight_scale, bias, x_scale)
    _, _, _, packed, zeros = entry
    codes = _quantize_rows_into_scratch(x.reshape(-1, x.shape[-1]), x_scale)
    scale = (weight_scale * x_scale).contiguous()  # the reference's float32 scale vector, bit for bit
    out = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, packed, scale, zeros, None, 1.0, 0, torch.float32,
                                             "none", [], "")  # = acc.to(float32) * scale, exactly
    if bias is not None:
        out.add_(bias.float())
    return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


_lib.impl("int8_linear", int8_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::int8_linear", lib=_lib)
def _int8_linear_fake(x, weight, weight_scale, bias, x_scale):
    _check_int8(x, weight, weight_scale, bias, x_scale)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# Every op kiln registers: what artifacts, the verifier and the torch backend admit of ``kiln::``.
OPS: frozenset[torch._ops.OpOverload] = frozenset({torch.ops.kiln.moe_experts.default,
                                                   torch.ops.kiln.grouped_mm.default,
                                                   torch.ops.kiln.nested_linear.default,
                                                   torch.ops.kiln.int8_linear.default})


def is_kiln_op(target) -> bool:
    """Whether ``target`` is one of the ops this module registers."""
    return target in OPS
