"""The CPU target's library dispatch: the FX nodes that run as PyTorch kernels instead of TIR.

The rules of the shared mechanism (``kiln/backends/tvm/dispatch.py``) for
this CPU: untuned TIR GEMMs are ~70x slower than PyTorch's, so GEMM-class
ops, attention and convolution go to PyTorch's CPU kernels. Transcendentals
(exp, tanh, erf, gelu, silu) do not: TVM's ``fast_*`` polynomials beat
PyTorch's kernels here and fuse with their neighbours (see ``convert._fast``).

Each rule's packed function is registered by the runtime in
``kiln/runtime/kernels/tvm_dispatch.py`` (a test checks the two tables agree;
``tvm_dispatch.ABI`` is the version of their argument lists). Rules marked
``returns`` (attention and oneDNN's GEMMs, which have no ``out=``) hand
PyTorch's result tensor to TVM. Which GEMM kernel runs each dispatched GEMM
(eager's MKL call, in column blocks, or oneDNN) is measured per shape by the
next stage, ``gemm.select_gemm_kernels``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...runtime.kernels import tvm_dispatch
from . import attention
from ...ir.rewrite import node_arg
from ..tvm.dispatch import Args, DispatchRule, LibraryDispatch, heads_last_source

aten = torch.ops.aten


# Dtypes PyTorch's library kernels compute exactly as eager does here (the same call).
_LIBRARY_DTYPES = (torch.float32, torch.bfloat16)


def _library_dtype(*nodes) -> bool:
    """All tensors, of one dtype that the library rules take (fp32, or bf16: AMX / AVX512-BF16 GEMMs)."""
    dtypes = {n.meta["val"].dtype for n in nodes if isinstance(n, fx.Node)}
    return all(isinstance(n, fx.Node) for n in nodes) and len(dtypes) == 1 and dtypes <= set(_LIBRARY_DTYPES)


def _linear(node):
    x, w, b = node.args[0], node.args[1], node_arg(node, 2, "bias")
    if not _library_dtype(x, w) or w.meta["val"].dim() != 2:
        return None
    return [x, w] if b is None else [x, w, b]


def _linear_bias(node):
    args = _linear(node)
    return args if args is not None and len(args) == 3 else None


def _linear_nobias(node):
    args = _linear(node)
    return args if args is not None and len(args) == 2 else None


def _addmm(node):
    b, x, w = node.args[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or not _library_dtype(b, x, w):
        return None
    return [b, x, w]


def _one_call(args_of):
    """The GEMM rules' arguments plus ``block`` 0: one call (``gemm.select_gemm_kernels`` may choose column blocks)."""
    def args(node):
        a = args_of(node)
        return None if a is None else a + [0]
    return args


def _binary_f32(node):
    return list(node.args[:2]) if _library_dtype(*node.args[:2]) else None


def _sdpa(node, masked: bool):
    """``[q, k, v, (mask), causal, scale, gqa]`` then eager's strides (``attention.eager_strides``)."""
    q, k, v = node.args[:3]
    mask = node_arg(node, 3, "attn_mask")
    if (mask is not None) != masked or not _library_dtype(q, k, v) or node_arg(node, 4, "dropout_p", 0.0) != 0.0:
        return None
    if attention.computes(node):  # the target's own kernels (attention.py), not the library's
        return None
    strides = attention.eager_strides(q, k, v)
    if strides is None:
        return None
    scale = node.kwargs.get("scale")
    flags = [int(bool(node_arg(node, 5, "is_causal", False))), 0.0 if scale is None else float(scale),
             int(bool(node.kwargs.get("enable_gqa", False)))]
    return [q, k, v] + ([mask] if masked else []) + flags + strides


def _sdpa_bshd(node, masked: bool):
    """Attention on [B, S, H, D] buffers: the head split/merge transposes become strided views.

    Eager hands ``q.view(B, S, H, D).transpose(1, 2)`` to sdpa as a strided view,
    and PyTorch's CPU attention writes its output [B, S, H, D]-contiguous (a
    transposed view of [B, H, S, D]); as Relax tensors both transposes would be
    copies. Here each of q, k, v that is such a transpose is passed untransposed
    (bit i of ``layout``), and the output is returned [B, S, H, D] (PyTorch's
    own tensor, no copy into a TVM buffer), so the ``transpose(1, 2)`` that
    merges the heads back reads it as is (convert.py).
    """
    args = _sdpa(node, masked)
    if args is None or node.args[0].meta["val"].dim() != 4:
        return None
    layout = 0
    for i in range(3):
        src = heads_last_source(args[i])
        if src is not None:
            args[i] = src
            layout |= 1 << i
    flags = 7 if masked else 6  # the index after q, k, v, (mask), causal, scale, gqa
    return args[:flags] + [layout] + args[flags:]


def _single_user_of(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target and len(node.users) == 1


def _is_cast(node, dtype: torch.dtype) -> bool:
    """``node`` is ``x.to(dtype)`` (``_to_copy``, as ``lower_precision`` writes its casts)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten._to_copy.default
            and node.kwargs.get("dtype") == dtype and node.meta["val"].dtype == dtype)


def _static_input(args):
    """``args`` when its first tensor has a static shape (the fused calls take the flag of a static input), else
    None."""
    return args if args is not None and all(isinstance(d, int) for d in args[0].meta["val"].shape) else None


def _bf16_linear_read_once(node):
    return _single_user_of(node, aten.linear.default) and node.meta["val"].dtype == torch.bfloat16


def _gelu_chain(node):
    """``node`` = ``gelu(linear(x, w, b) as fp32)`` as bf16, each step read only by the next (what ``lower_precision``
    makes of a bf16 FFN's first linear and its GELU): ``(linear, cast to fp32, gelu)``, else None."""
    if not _is_cast(node, torch.bfloat16):
        return None
    gelu = node.args[0]
    if not _single_user_of(gelu, aten.gelu.default) or gelu.meta["val"].dtype != torch.float32:
        return None
    up = gelu.args[0]
    if not (_is_cast(up, torch.float32) and len(up.users) == 1 and _bf16_linear_read_once(up.args[0])):
        return None
    return up.args[0], up, gelu


def _linear_bias_gelu_bf16(node):
    """``[x, w, b, tanh]`` for ``gelu(linear(x, w, b))`` in bf16 as one oneDNN call (see the rule below)."""
    chain = _gelu_chain(node)
    if chain is None or not torch.backends.mkldnn.is_available():
        return None
    linear, _, gelu = chain
    args = _static_input(_linear_bias(linear))
    approximate = node_arg(gelu, 1, "approximate", "none")
    return None if args is None else args + [int(approximate == "tanh")]


def _gelu_chain_nodes(node):
    return list(_gelu_chain(node))


def _linear_to_output(node):
    """``node`` = a bf16 linear's result as fp32, read only by the graph's output (an LM head's logits in bf16
    mode), the linear read by the cast alone: the linear's ``[x, w, (b)]``, else None."""
    if not (_is_cast(node, torch.float32) and node.users and all(u.op == "output" for u in node.users)
            and _bf16_linear_read_once(node.args[0])):
        return None
    return _static_input(_linear(node.args[0]))


def _embedding(node):
    # PyTorch's kernel checks every index against the table (IndexError, as in eager);
    # TVM's `take` would read out of bounds: garbage, or a crash.
    weight, indices = node.args[:2]
    return [weight, indices] if weight.meta["val"].dim() == 2 else None


def _gather_like(node):
    # index_select / gather with indices computed at run time: PyTorch bounds-checks
    # every index (IndexError / RuntimeError, as in eager); TVM's lowering does not.
    x, dim, index = node.args[:3]
    if not isinstance(index, fx.Node) or not isinstance(dim, int):
        return None
    return [x, index, dim % x.meta["val"].dim()]


def _index(node):
    # Advanced indexing by integer index tensors (``x[:, t]``); bool masks give run-time shapes.
    x, indices = node.args[:2]
    given = [(d, t) for d, t in enumerate(indices) if t is not None]
    if not given or not all(isinstance(t, fx.Node) and t.meta["val"].dtype in (torch.int64, torch.int32)
                            for _, t in given):
        return None
    return [x, sum(1 << d for d, _ in given)] + [t for _, t in given]


def _conv2d(node):
    x, w = node.args[:2]
    b = node_arg(node, 2, "bias")
    if not _library_dtype(x, w) or (b is not None and not _library_dtype(b)):
        return None
    stride, padding, dilation = (list(node_arg(node, i, k, d)) for i, k, d in
                                 ((3, "stride", [1, 1]), (4, "padding", [0, 0]), (5, "dilation", [1, 1])))
    if isinstance(padding[0], str) or len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        return None
    groups = node_arg(node, 6, "groups", 1)
    return [x, w] + ([b] if b is not None else []) + stride + padding + dilation + [groups]


def _conv2d_bias(node):
    return _conv2d(node) if node_arg(node, 2, "bias") is not None else None


def _conv2d_nobias(node):
    return _conv2d(node) if node_arg(node, 2, "bias") is None else None


RULES: list[DispatchRule] = [
    DispatchRule("embedding", aten.embedding.default, "kiln.embedding", _embedding),
    DispatchRule("index_select", aten.index_select.default, "kiln.index_select", _gather_like),
    DispatchRule("gather", aten.gather.default, "kiln.gather", _gather_like),
    DispatchRule("index", aten.index.Tensor, "kiln.index", _index),
    # A bf16 linear, its GELU and the casts around it (lower_precision's bf16 FFN): one oneDNN call applying the
    # GELU to the fp32 accumulator of each output block in cache and rounding once to bf16, instead of the GEMM
    # rounding to bf16, then TVM's cast-GELU-cast kernel on one thread (MiniLM's 128x1536: 120 us a call).
    # Closer to fp32 than the unfused chain (one rounding instead of two); a non-finite input runs that chain
    # on eager's kernels (F2), so it gets eager's values there.
    DispatchRule("linear_bias_gelu_bf16", aten._to_copy.default, "kiln.linear_bias_gelu_bf16", _linear_bias_gelu_bf16,
                 returns=True, finite_flag=True, absorbs=_gelu_chain_nodes),
    # A bf16 linear whose fp32 result is a graph output (bf16 mode's LM head): the GEMM, then its conversion into
    # the output buffer on PyTorch's threads, instead of TVM's cast kernel on one thread (Llama's 128x32000
    # logits: about 2 ms of 14). PyTorch's CPU GEMMs give no fp32 result from bf16 inputs.
    DispatchRule("linear_bf16_to_f32", aten._to_copy.default, "kiln.linear_bf16_to_f32",
                 lambda n: _linear_to_output(n), finite_flag=True, absorbs=lambda n: [n.args[0]]),
    DispatchRule("linear", aten.linear.default, "kiln.linear", _one_call(_linear_nobias)),
    DispatchRule("linear_bias", aten.linear.default, "kiln.linear_bias", _one_call(_linear_bias)),
    DispatchRule("addmm", aten.addmm.default, "kiln.addmm", _one_call(_addmm)),
    DispatchRule("mm", aten.mm.default, "kiln.mm", _binary_f32),
    DispatchRule("bmm", aten.bmm.default, "kiln.bmm", _binary_f32),
    DispatchRule("matmul", aten.matmul.default, "kiln.matmul", _binary_f32),
    DispatchRule("sdpa_bshd", aten.scaled_dot_product_attention.default, "kiln.sdpa_bshd",
                 lambda n: _sdpa_bshd(n, masked=False), returns=True),
    DispatchRule("sdpa_mask_bshd", aten.scaled_dot_product_attention.default, "kiln.sdpa_mask_bshd",
                 lambda n: _sdpa_bshd(n, masked=True), returns=True),
    DispatchRule("sdpa", aten.scaled_dot_product_attention.default, "kiln.sdpa",
                 lambda n: _sdpa(n, masked=False)),
    DispatchRule("sdpa_mask", aten.scaled_dot_product_attention.default, "kiln.sdpa_mask",
                 lambda n: _sdpa(n, masked=True)),
    DispatchRule("conv2d", aten.conv2d.default, "kiln.conv2d", _conv2d_nobias),
    DispatchRule("conv2d_bias", aten.conv2d.default, "kiln.conv2d_bias", _conv2d_bias),
]


# The same GEMMs on oneDNN (no ``out=``: they return their result). Never planned
# directly: ``gemm.select_gemm_kernels`` swaps one in where it measured faster. A bf16 linear also gets its
# input's non-finite flag from a TVM kernel (``finite_flag``): such an input runs eager's kernel (F2).
# Keyed by the rule each replaces; their arguments are that rule's without ``block``.
ONEDNN_RULES: dict[str, DispatchRule] = {
    "linear": DispatchRule("linear_onednn", aten.linear.default, "kiln.linear_onednn", _linear_nobias, returns=True,
                           finite_flag=True),
    "linear_bias": DispatchRule("linear_bias_onednn", aten.linear.default, "kiln.linear_bias_onednn", _linear_bias,
                                returns=True, finite_flag=True),
    "addmm": DispatchRule("addmm_onednn", aten.addmm.default, "kiln.addmm_onednn", _addmm, returns=True),
}
# f32 linears on weights the runtime packs once at load for MKL's sgemm at the program's row count
# (``tvm_dispatch.pack_f32_weights``); swapped in by ``gemm.select_gemm_kernels`` where measured faster.
MKL_PACKED_RULES: dict[str, DispatchRule] = {
    "linear": DispatchRule("linear_mkl_packed", aten.linear.default, "kiln.linear_mkl_packed", _linear_nobias,
                           returns=True),
    "linear_bias": DispatchRule("linear_bias_mkl_packed", aten.linear.default, "kiln.linear_bias_mkl_packed",
                                _linear_bias, returns=True),
}
# f32 linears on oneDNN, on weights the runtime packs once at load into oneDNN's blocked layout for the
# program's row count (``tvm_dispatch.pack_onednn_f32_weights``); swapped in where measured faster.
ONEDNN_PACKED_RULES: dict[str, DispatchRule] = {
    "linear": DispatchRule("linear_onednn_packed", aten.linear.default, "kiln.linear_onednn_packed", _linear_nobias,
                           returns=True),
    "linear_bias": DispatchRule("linear_bias_onednn_packed", aten.linear.default, "kiln.linear_bias_onednn_packed",
                                _linear_bias, returns=True),
}
ALL_RULES = RULES + [*ONEDNN_RULES.values(), *MKL_PACKED_RULES.values(), *ONEDNN_PACKED_RULES.values()]

# Rules whose output is written [B, S, H, D] (the FX node's value is its transpose(1, 2)).
BSHD_OUTPUT = {"sdpa_bshd", "sdpa_mask_bshd"}
_UNMASKED = {"sdpa_mask": "sdpa", "sdpa_mask_bshd": "sdpa_bshd"}


def _is_causal_mask(mask: torch.Tensor) -> bool:
    """A bool [.., L, L] mask that is the lower triangle in every batch and head (sdpa's ``is_causal``)."""
    if mask.dtype != torch.bool or mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    n = mask.shape[-1]
    return bool(torch.equal(mask, torch.ones(n, n, dtype=torch.bool).tril().expand_as(mask)))


def specialize(rule: DispatchRule, args: Args, constants: dict[fx.Node, torch.Tensor]) -> tuple[DispatchRule, Args]:
    """A cheaper equivalent call once constant inputs are known (folded values and weights).

    An attention mask that is a constant all-True bool (HF builds one for
    encoders without padding, e.g. ViT) masks nothing: drop it, so PyTorch
    does not convert and apply it on every call. A constant lower-triangular
    mask over a square score matrix (a causal LM traced without padding) is
    ``is_causal=True``, which is what eager HF passes there: PyTorch then
    skips the blocks above the diagonal instead of masking them.
    """
    if rule.name in _UNMASKED:
        mask = args[3]
        value = constants.get(mask)
        if value is not None and value.dtype == torch.bool:
            if bool(value.all()):
                return _BY_NAME[_UNMASKED[rule.name]], args[:3] + args[4:]
            q_shape = args[0].meta["val"].shape
            q_len = q_shape[1] if rule.name == "sdpa_mask_bshd" and args[7] & 1 else q_shape[-2]
            if args[4] == 0 and value.shape[-1] == q_len and _is_causal_mask(value):
                return _BY_NAME[_UNMASKED[rule.name]], args[:3] + [1] + args[5:]
    return rule, args


_BY_NAME = {rule.name: rule for rule in RULES}

# The CPU's library dispatch, as the shared pipeline takes it (its plan of a graph: ``DISPATCH.plan(gm)``).
DISPATCH = LibraryDispatch(rules=tuple(RULES), abi=tvm_dispatch.ABI, specialize=specialize,
                           heads_last_output=frozenset(BSHD_OUTPUT))

