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
"""
from __future__ import annotations

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
    return torch.clamp(torch.round(x.float() / x_scale), -127, 127).to(torch.int8)


def int8_linear(x, weight, weight_scale, bias, x_scale):
    _check_int8(x, weight, weight_scale, bias, x_scale)
    rows = x.reshape(-1, x.shape[-1])
    acc = torch._int_mm(quantize_activation(rows, x_scale), weight.t())  # exact int32 accumulation
    out = acc.to(torch.float32) * (weight_scale * x_scale)
    if bias is not None:
        out = out + bias.float()
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
