"""bf16 mode's fused library calls on the cpu target (``kiln/backends/cpu/dispatch.py``).

``linear_bias_gelu_bf16``: the FFN linear and its GELU as one oneDNN call.
``lower_precision`` makes ``gelu(linear(x))`` a bf16 linear, a cast to fp32, the GELU and a cast back to bf16;
the cpu target runs the four as one oneDNN inner product whose GELU reads the fp32 accumulator (one rounding
instead of two). Checked: which chains it takes, that the output is at least as close to fp32 as the unfused
chain's (on the same bf16 weights), and that a non-finite input gets the unfused chain's values on eager's
kernels, NaN in its own row.

``linear_bf16_to_f32``: a bf16 linear whose fp32 result is a graph output (the LM head) converted into the
output buffer on PyTorch's threads: bitwise the unfused GEMM-then-cast, NaN in its own row.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kiln
from kiln.backends.cpu import CpuOptions, dispatch
from kiln.passes import lower_precision

from packed_weights import check_packed_after_fresh_load

pytestmark = pytest.mark.skipif(not lower_precision.bf16_units()[0] or not torch.backends.mkldnn.is_available(),
                                reason="no bf16 units")
BF16 = kiln.CompileOptions(precision="bf16")


class Ffn(nn.Module):
    def __init__(self, approximate="none", gelu_read_twice=False):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)
        self.approximate, self.twice = approximate, gelu_read_twice

    def forward(self, x):
        h = nn.functional.gelu(self.up(x), approximate=self.approximate)
        out = self.down(h)
        return (out, h.sum()) if self.twice else out


def _report(cm):
    (part,) = cm.manifest["partitions"]
    return part["report"]["nodes"]


def _bf16_chain(model, x):
    """The unfused chain on the compiled model's bf16 weights: the bf16 GEMM rounded, GELU in fp32, rounded."""
    up_w, up_b = model.up.weight.bfloat16(), model.up.bias.bfloat16()
    h = nn.functional.gelu(nn.functional.linear(x.bfloat16(), up_w, up_b).float(), approximate=model.approximate)
    return nn.functional.linear(h.bfloat16(), model.down.weight.bfloat16(), model.down.bias.bfloat16()).float()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_chain_is_one_call_at_least_as_close_to_fp32(approximate):
    model, x = Ffn(approximate).eval(), torch.randn(2, 16, 64)
    cm = kiln.compile(model, (x,), options=BF16)
    how = {r["node"]: r for r in _report(cm)}
    (gelu_call,) = [n for n, r in how.items() if r.get("function") == "kiln.linear_bias_gelu_bf16"]
    assert [r["op"] for r in how.values() if r.get("into") == gelu_call] == [
        "aten.linear.default", "aten._to_copy.default", "aten.gelu.default"]
    with torch.no_grad():
        reference, chain = model(x), _bf16_chain(model, x)
    got = cm(x)
    assert got.dtype == torch.float32
    scale = reference.abs().max().item()
    assert (got - reference).abs().max().item() <= (chain - reference).abs().max().item() + scale * 2 ** -8
    assert (got - reference).abs().max().item() <= scale * 2 ** -6  # bf16 mode's stated bound


def test_a_gelu_read_twice_is_not_fused():
    model, x = Ffn(gelu_read_twice=True).eval(), torch.randn(2, 16, 64)
    cm = kiln.compile(model, (x,), options=BF16)
    assert not [r for r in _report(cm) if r.get("function") == "kiln.linear_bias_gelu_bf16"]
    with torch.no_grad():
        want = model(x)
    got = cm(x)
    torch.testing.assert_close(got[0], want[0], rtol=2 ** -6, atol=want[0].abs().max().item() * 2 ** -6)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_input_gets_the_unfused_chains_values(value):
    model, x = Ffn().eval(), torch.randn(1, 16, 64)
    cm = kiln.compile(model, (x,), options=BF16)
    x[0, 9, 5] = value
    got = cm(x)
    with torch.no_grad():
        want = _bf16_chain(model, x)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=2 ** -6, atol=want.nan_to_num().abs().max() * 2 ** -6)
    assert not torch.isfinite(got[0, 9]).all()
    assert torch.isfinite(got[0, :9]).all() and torch.isfinite(got[0, 10:]).all()


class Head(nn.Module):
    def __init__(self, bias):
        super().__init__()
        torch.manual_seed(1)
        self.norm, self.head = nn.LayerNorm(64), nn.Linear(64, 3000, bias=bias)

    def forward(self, x):
        return self.head(self.norm(x))



class FfnAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn, self.head = Ffn(), Head(bias=False)

    def forward(self, x):
        return self.head(self.ffn(x))


@pytest.mark.parametrize("bias", [False, True])
def test_an_output_linear_converts_into_the_output_bitwise_as_gemm_then_cast(monkeypatch, bias):
    model, x = Head(bias).eval(), torch.randn(1, 24, 64)
    cm = kiln.compile(model, (x,), options=BF16)
    assert [r["function"] for r in _report(cm) if r.get("function", "").startswith("kiln.linear")] == [
        "kiln.linear_bf16_to_f32"]
    monkeypatch.setattr(dispatch, "_linear_to_output", lambda node: None)
    unfused = kiln.compile(model, (x,), options=BF16)
    assert "kiln.linear_bf16_to_f32" not in [r.get("function") for r in _report(unfused)]
    got = cm(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, unfused(x))
    x[0, 4, 7] = float("nan")
    got = cm(x)
    assert got[0, 4].isnan().all() and not got[0, :4].isnan().any() and not got[0, 5:].isnan().any()


def test_fused_calls_find_their_packed_weights_after_a_fresh_load(tmp_path, fresh_python):
    model, x = FfnAndHead().eval(), torch.randn(1, 16, 64)
    cm = kiln.compile(model, (x,), options=BF16)
    functions = {r.get("function") for r in _report(cm)}
    assert {"kiln.linear_bias_gelu_bf16", "kiln.linear_bf16_to_f32"} <= functions
    check_packed_after_fresh_load(fresh_python, cm, x, cm(x), tmp_path, count=3)


def test_mkl_mode_keeps_eagers_gemm_kernel_so_fuses_nothing():
    model, x = FfnAndHead().eval(), torch.randn(1, 16, 64)
    cm = kiln.compile(model, (x,), options=kiln.CompileOptions(
        precision="bf16", backend_options={"cpu": CpuOptions(gemm_kernels="mkl")}))
    report = _report(cm)
    assert not [r for r in report if r["how"] == "fused"]
    assert sorted(r["function"] for r in report if r["how"] == "dispatch" and "linear" in r["function"]) == [
        "kiln.linear", "kiln.linear_bias", "kiln.linear_bias"]
    with torch.no_grad():
        want = model(x)
    got = cm(x)
    assert (got - want).abs().max().item() <= want.abs().max().item() * 2 ** -6
