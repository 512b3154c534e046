"""``kiln::int8_linear``: the NPU's w8a8 linear (static per-tensor activation scale, int32 accumulation)."""
import pytest
import torch

from kiln.ir.ops import OPS, quantize_activation


def _case(rows=(3, 5), k=64, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, k, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    return x, w, s


def test_matches_the_integer_reference_exactly_in_its_integer_part():
    x, w, s = _case()
    x_scale = x.abs().max().item() / 127
    out = torch.ops.kiln.int8_linear(x, w, s, None, x_scale)
    codes = torch.clamp(torch.round(x / x_scale), -127, 127).to(torch.int64)
    acc = codes.reshape(-1, 64) @ w.to(torch.int64).t()  # exact in int64
    ref = (acc.float() * (s * x_scale)).reshape(3, 5, 32)
    assert torch.equal(out, ref)
    assert torch.ops.kiln.int8_linear.default in OPS


def test_activations_beyond_the_scale_saturate():
    x_scale = 0.1
    x = torch.tensor([[100.0, -100.0, 0.04, 0.06]])
    assert quantize_activation(x, x_scale).tolist() == [[127, -127, 0, 1]]


@pytest.mark.parametrize("rows", [(1,), (1, 1), (2, 7), (17,)])
def test_any_row_count_and_bias(rows):
    x, w, s = _case(rows=rows)
    bias = torch.randn(32)
    x_scale = 0.05
    out = torch.ops.kiln.int8_linear(x, w, s, bias, x_scale)
    ref = quantize_activation(x, x_scale).float() @ w.float().t() * (s * x_scale) + bias
    assert out.shape == (*rows, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused_by_name():
    x, w, s = _case()
    with pytest.raises(RuntimeError, match="weight must be int8"):
        torch.ops.kiln.int8_linear(x, w.float(), s, None, 0.1)
    with pytest.raises(RuntimeError, match="x_scale must be > 0"):
        torch.ops.kiln.int8_linear(x, w, s, None, 0.0)
    with pytest.raises(RuntimeError, match="64 features"):
        torch.ops.kiln.int8_linear(x[..., :10], w, s, None, 0.1)
