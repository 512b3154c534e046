"""Library dispatch: choose the FX nodes that run as PyTorch kernels instead of TIR.

The first stage of the CPU pipeline, like TVM's ``library_dispatch_passes``,
but on the FX graph: an ATen node says exactly what PyTorch's kernel computes
(``linear``'s transposed weight, ``scaled_dot_product_attention``'s bool mask,
scale and GQA flags), so nothing has to be recovered from a decomposed Relax
pattern. Untuned TIR GEMMs are ~70x slower than PyTorch's, so GEMM-class ops,
attention and convolution go to the library. Transcendentals (exp, tanh, erf,
gelu, silu) do not: TVM's ``fast_*`` polynomials beat PyTorch's kernels here
and fuse with their neighbours (see ``convert._fast``).

Each rule names the packed function the converter emits with
``R.call_dps_packed``; the runtime registers a function of that name in
``kiln/runtime/kernels/tvm_dispatch.py`` (a test checks the two tables agree).
Scalar attributes travel as ``R.prim_value`` arguments before the output.
``plan_dispatch`` only reads the graph; it must run before conversion.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

# Packed-function argument list for one node: FX arguments (tensors) and Python
# scalars; the converter turns tensors into Relax values and scalars into prim values.
Args = list


@dataclass(frozen=True)
class DispatchRule:
    name: str  # the rule, for the report and tests
    op: torch._ops.OpOverload
    function: str  # the registered packed function it calls
    args: Callable[[fx.Node], Args | None]  # None: the rule does not apply to this node


def _arg(node: fx.Node, i: int, key: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def _is_f32(*nodes) -> bool:
    return all(isinstance(n, fx.Node) and n.meta["val"].dtype == torch.float32 for n in nodes)


def _linear(node):
    x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias")
    if not _is_f32(x, w) or w.meta["val"].dim() != 2:
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
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or not _is_f32(b, x, w):
        return None
    return [b, x, w]


def _binary_f32(node):
    return list(node.args[:2]) if _is_f32(*node.args[:2]) else None


def _sdpa(node, masked: bool):
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    if (mask is not None) != masked or not _is_f32(q, k, v) or _arg(node, 4, "dropout_p", 0.0) != 0.0:
        return None
    scale = node.kwargs.get("scale")
    flags = [int(bool(_arg(node, 5, "is_causal", False))), 0.0 if scale is None else float(scale),
             int(bool(node.kwargs.get("enable_gqa", False)))]
    return [q, k, v] + ([mask] if masked else []) + flags


def _embedding(node):
    # PyTorch's kernel checks every index against the table (IndexError, as in eager);
    # TVM's `take` would read out of bounds: garbage, or a crash.
    weight, indices = node.args[:2]
    return [weight, indices] if weight.meta["val"].dim() == 2 else None


def _conv2d(node):
    x, w = node.args[:2]
    b = _arg(node, 2, "bias")
    if not _is_f32(x, w) or (b is not None and not _is_f32(b)):
        return None
    stride, padding, dilation = (list(_arg(node, i, k, d)) for i, k, d in
                                 ((3, "stride", [1, 1]), (4, "padding", [0, 0]), (5, "dilation", [1, 1])))
    if isinstance(padding[0], str) or len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        return None
    groups = _arg(node, 6, "groups", 1)
    return [x, w] + ([b] if b is not None else []) + stride + padding + dilation + [groups]


def _conv2d_bias(node):
    return _conv2d(node) if _arg(node, 2, "bias") is not None else None


def _conv2d_nobias(node):
    return _conv2d(node) if _arg(node, 2, "bias") is None else None


RULES: list[DispatchRule] = [
    DispatchRule("embedding", aten.embedding.default, "kiln.embedding", _embedding),
    DispatchRule("linear", aten.linear.default, "kiln.linear", _linear_nobias),
    DispatchRule("linear_bias", aten.linear.default, "kiln.linear_bias", _linear_bias),
    DispatchRule("addmm", aten.addmm.default, "kiln.addmm", _addmm),
    DispatchRule("mm", aten.mm.default, "kiln.mm", _binary_f32),
    DispatchRule("bmm", aten.bmm.default, "kiln.bmm", _binary_f32),
    DispatchRule("matmul", aten.matmul.default, "kiln.matmul", _binary_f32),
    DispatchRule("sdpa", aten.scaled_dot_product_attention.default, "kiln.sdpa",
                 lambda n: _sdpa(n, masked=False)),
    DispatchRule("sdpa_mask", aten.scaled_dot_product_attention.default, "kiln.sdpa_mask",
                 lambda n: _sdpa(n, masked=True)),
    DispatchRule("conv2d", aten.conv2d.default, "kiln.conv2d", _conv2d_nobias),
    DispatchRule("conv2d_bias", aten.conv2d.default, "kiln.conv2d_bias", _conv2d_bias),
]


def specialize(rule: DispatchRule, args: Args, constants: dict[fx.Node, torch.Tensor]) -> tuple[DispatchRule, Args]:
    """A cheaper equivalent call once constant inputs are known (the converter folds them).

    An attention mask that is a constant all-True bool (HF builds one for
    encoders without padding, e.g. ViT) masks nothing: drop it, so PyTorch
    does not convert and apply it on every call.
    """
    if rule.name == "sdpa_mask":
        mask = args[3]
        value = constants.get(mask)
        if value is not None and value.dtype == torch.bool and bool(value.all()):
            return _BY_NAME["sdpa"], args[:3] + args[4:]
    return rule, args


def plan_dispatch(gm: fx.GraphModule, rules: list[DispatchRule] = RULES) -> dict[fx.Node, tuple[DispatchRule, Args]]:
    """The nodes of ``gm`` that go to the library, with the rule and arguments for each."""
    by_op: dict = {}
    for rule in rules:
        by_op.setdefault(rule.op, []).append(rule)
    plan = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for rule in by_op.get(node.target, ()):
            args = rule.args(node)
            if args is not None:
                plan[node] = (rule, args)
                break
    return plan


_BY_NAME = {rule.name: rule for rule in RULES}
