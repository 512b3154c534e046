"""The dispatched attention on non-finite inputs runs PyTorch's fused kernel on q, k and v laid out as eager's were.

PyTorch's fused CPU attention handles NaN differently by layout (FINDINGS F7, F10), so only eager's own layout
gives eager's result: ``tvm_dispatch._laid_out`` rebuilds it (expanded dimensions, gaps), and a self-overlapping
layout no tensor can be written in goes to the math path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.runtime.kernels import tvm_dispatch

from attention_checks import same as _same


@pytest.mark.parametrize("make", [
    lambda x: x,  # already eager's layout
    lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),  # a transposed view
    lambda x: torch.cat([x, x], -1)[..., ::2],  # gaps
    lambda x: x[:, :1].expand(x.shape),  # an expanded (stride 0) dimension
])
def test_laid_out_has_eager_strides_and_values(make):
    torch.manual_seed(0)
    eager = make(torch.randn(2, 3, 5, 4))
    laid = tvm_dispatch._laid_out(eager.contiguous(), tuple(eager.stride()))
    assert laid.stride() == eager.stride() and torch.equal(laid, eager)


def test_a_self_overlapping_layout_is_none():
    x = torch.randn(3, 4)
    assert tvm_dispatch._laid_out(x, (1, 1)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["strided NaN rows (F7)", "one key, NaN scores (F10)"])
def test_non_finite_attention_gives_eagers_result(dtype, case):
    torch.manual_seed(0)
    if case.startswith("strided"):
        x = torch.randn(4, 8, 8, 7, dtype=dtype)
        x[0, 1, 2, 3] = float("nan")
        x[1, 0, 5, 0] = float("inf")
        eager_v = x.mT  # eager's attention reads a transposed view
    else:
        eager_v = torch.log(torch.randn(8, 11, 11, dtype=dtype)).unsqueeze(-2)  # NaN where x < 0
    want = F.scaled_dot_product_attention(eager_v, eager_v, eager_v, is_causal=True)
    v = eager_v.contiguous()  # what TVM's buffers hold
    strides = [v.dim(), *eager_v.stride() * 3]
    got = tvm_dispatch._attention(v, v, v, None, 1, 0.0, 0, strides)
    assert _same(got, want)


@pytest.mark.parametrize("finite", [True, False], ids=["finite", "NaN"])
def test_inputs_in_eagers_layout_skip_the_finiteness_check(monkeypatch, finite):
    """q, k and v already with eager's strides (a decode step's) run the fused kernel as eager did, with no sums
    over them; in another layout the sums run (and, on a NaN, the inputs are laid out as eager's)."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 4, 16).transpose(1, 2)  # eager's q: a transposed view of the projection
    k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 4, 9, 16)
    if not finite:
        k[0, 1, 3, 2] = float("nan")
    want = F.scaled_dot_product_attention(q, k, v)
    strides = [4, *q.stride(), *k.stride(), *v.stride()]
    sums = []
    real_sum = tvm_dispatch._sum
    monkeypatch.setattr(tvm_dispatch, "_sum", lambda x: sums.append(x.shape) or real_sum(x))
    assert _same(tvm_dispatch._attention(q, k, v, None, 0, 0.0, 0, strides), want) and sums == []
    other = k.mT.contiguous().mT  # k in another layout
    got = tvm_dispatch._attention(q, other, v, None, 0, 0.0, 0, strides)
    assert len(sums) == 3  # finite: the fused kernel on this layout (rounding may differ); NaN: eager's layout
    assert torch.allclose(got, want, atol=1e-6) if finite else _same(got, want)
