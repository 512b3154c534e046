"""The bf16 non-finite flag kernel (``kiln.backends.tvm.finite``) and the bf16 linears that read it.

oneDNN's bf16 inner product spreads a NaN of one input row into the row before (FINDINGS F2), so a compiled
bf16 linear runs eager's kernel when its input holds a NaN or inf. The flag now comes from a TVM kernel
emitted before the call, instead of a PyTorch sum inside it: checked here bit-exactly against
``torch.isfinite`` on every kind of value, and end to end (the sum no longer runs; NaN stays in its row).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import tvm

import kiln
from kiln.backends.cpu import CpuOptions
from kiln.backends.cpu.target import host_target
from kiln.backends.tvm import convert, finite
from kiln.passes import lower_precision
from kiln.runtime.kernels import tvm_dispatch

_BUILT: dict[int, object] = {}


def _flag(x: torch.Tensor) -> int:
    n = x.numel()
    if n not in _BUILT:
        func = finite.nonfinite_flag_func(n).with_attr("global_symbol", "flag")
        _BUILT[n] = tvm.compile(func, target=tvm.target.Target(host_target()))["flag"]
    out = torch.full((1,), -1, dtype=torch.int32)
    _BUILT[n](tvm.runtime.from_dlpack(x.reshape(-1).contiguous()), tvm.runtime.from_dlpack(out))
    return int(out.item())


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64 * 5 + 7, 4096])
def test_flag_is_isfinite_on_every_kind_of_value(n):
    torch.manual_seed(n)
    x = torch.randn(n).bfloat16()
    assert _flag(x) == 0
    specials = [float("nan"), -float("nan"), float("inf"), -float("inf")]
    finite_extremes = [torch.finfo(torch.bfloat16).max, -torch.finfo(torch.bfloat16).max,
                       torch.finfo(torch.bfloat16).tiny / 4, 0.0, -0.0]  # largest, subnormal, zeros
    for pos in sorted({0, n // 2, n - 1}):
        for v in specials + finite_extremes:
            y = x.clone()
            y[pos] = v
            assert _flag(y) == int(not bool(torch.isfinite(y).all())), (pos, v)


def test_flag_of_random_bit_patterns_matches_isfinite():
    torch.manual_seed(0)
    for _ in range(50):
        bits = torch.randint(-(1 << 15), 1 << 15, (257,), dtype=torch.int32).to(torch.int16)
        x = bits.view(torch.bfloat16)
        assert _flag(x) == int(not bool(torch.isfinite(x).all()))


needs_bf16 = pytest.mark.skipif(not lower_precision.bf16_units()[0], reason="no bf16 units")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 16, bias=False)).to(torch.bfloat16).eval()


@needs_bf16
def test_compiled_bf16_linears_read_the_flag_instead_of_summing_their_input(monkeypatch):
    m, x = _model(), torch.randn(1, 32, 24, dtype=torch.bfloat16)
    cm = kiln.compile(m, (x,))
    (part,) = cm.manifest["partitions"]
    assert {g["kernel"] for g in part["report"]["gemm_kernels"]} == {"onednn"}

    def no_sum(t):
        raise AssertionError("the input was summed")
    monkeypatch.setattr(tvm_dispatch, "_finite", no_sum)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x))  # bf16 tolerance
        for value in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[0, 7, 2] = value
            got, want = cm(y), m(y)
            torch.testing.assert_close(got, want, equal_nan=True)
            assert got[0, 7].isnan().any() and torch.isfinite(got[0, :7]).all() and torch.isfinite(got[0, 8:]).all()


@pytest.mark.parametrize("dtype, flags", [(torch.float32, 0), pytest.param(torch.bfloat16, 2, marks=needs_bf16)])
def test_only_bf16_linears_get_a_flag(monkeypatch, dtype, flags):
    emitted = []
    real = convert.emit_nonfinite_flag
    monkeypatch.setattr(convert, "emit_nonfinite_flag", lambda *a: emitted.append(a) or real(*a))
    m = _model().to(dtype)
    x = torch.randn(1, 32, 24, dtype=dtype)
    cm = kiln.compile(m, (x,), options=kiln.CompileOptions(
        backend_options={"cpu": CpuOptions(gemm_kernels="onednn")}))
    assert len(emitted) == flags
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x))
