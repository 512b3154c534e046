"""GEMM kernel selection (kiln/backends/cpu/gemm.py) and the runtime GEMM functions it chooses between."""
import pytest
import torch
from torch import nn

from kiln.backends.cpu import CpuOptions, gemm
from kiln.backends.cpu.dispatch import DISPATCH
from kiln.backends.cpu.target import CpuTarget
from kiln.backends.tvm import lower_partition
from kiln.errors import UnknownNameError
from kiln.runtime.kernels import tvm_dispatch

from test_tvm_lowering import export_partition, run_lowered

WIDE = 2 * gemm.COLUMN_BLOCK + 100  # column blocks are a candidate; the last one is partial


class Head(nn.Module):
    """A layer (linear + bias), a GPT-2 style Conv1D (addmm) and a wide LM head (linear, no bias)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.conv_w = nn.Parameter(torch.randn(64, 64) * 0.1)  # [K, N], as HF's Conv1D keeps it
        self.conv_b = nn.Parameter(torch.randn(64))
        self.lm = nn.Linear(64, WIDE, bias=False)

    def forward(self, x):
        h = self.proj(x)
        h = torch.addmm(self.conv_b, h.view(-1, 64), self.conv_w).view(x.shape)
        return self.lm(h)


def _plan():
    torch.manual_seed(0)
    model = Head().eval()
    x = torch.randn(2, 8, 64)
    gm, n, weights = export_partition(model, (x,))
    return model, x, gm, n, weights


def _fake_timer(us_by_rule: dict[str, dict[str, float]], asked: list):
    def timer(shape, kernels):
        asked.append((shape, kernels))
        return {k: us_by_rule[shape.rule][k] for k in kernels}
    return timer


def test_choose_keeps_eager_kernel_unless_another_is_clearly_faster():
    assert gemm.choose({"mkl": 100, "mkl_cols": 97, "onednn": 96}) == "mkl"  # within the 5% margin
    assert gemm.choose({"mkl": 100, "mkl_cols": 97, "onednn": 94}) == "onednn"
    assert gemm.choose({"mkl": 100, "mkl_cols": 90, "onednn": 88}) == "mkl_cols"  # oneDNN not 5% past the blocks
    assert gemm.choose({"mkl": 100, "onednn": 120}) == "mkl"


def test_packed_sgemm_needs_a_smaller_margin():
    # MKL's packed sgemm is the same library 5-10% faster: 2% suffices, a tie still keeps eager's kernel
    assert gemm.choose({"mkl": 100, "mkl_packed": 97, "onednn": 99}) == "mkl_packed"
    assert gemm.choose({"mkl": 100, "mkl_packed": 99, "onednn": 99}) == "mkl"
    assert gemm.choose({"mkl": 100, "mkl_packed": 97, "onednn": 93}) == "mkl_packed"  # oneDNN not 5% past it


def test_selection_applies_measured_choices_per_shape_and_reports_them():
    _, _, gm, _, _ = _plan()
    plan = DISPATCH.plan(gm)
    asked = []
    timer = _fake_timer({"linear_bias": {"mkl": 10, "onednn": 5},
                         "addmm": {"mkl": 10, "onednn": 12},
                         "linear": {"mkl": 100, "mkl_cols": 80, "onednn": 79}}, asked)
    chosen, report = gemm.select_gemm_kernels(plan, "measure", timer=timer)
    by_rule = {rule.name: args for rule, args in chosen.values()}
    assert set(by_rule) == {"linear_bias_onednn", "addmm", "linear"}
    assert by_rule["addmm"][-1] == 0 and by_rule["linear"][-1] == gemm.COLUMN_BLOCK
    assert len(by_rule["linear_bias_onednn"]) == 3  # x, w, b: oneDNN takes no block argument
    # Column blocks are only a candidate for the wide output.
    assert {s.rule: k for s, k in asked} == {"linear_bias": ["mkl", "onednn"], "addmm": ["mkl", "onednn"],
                                              "linear": ["mkl", "mkl_cols", "onednn"]}
    assert {r["gemm"]: r["kernel"] for r in report} == {
        "linear_bias [16x64] x [64x64]": "onednn", "addmm [16x64] x [64x64]": "mkl",
        f"linear [16x64] x [64x{WIDE}]": "mkl_cols"}
    assert all(r["nodes"] == 1 and r["us"] for r in report)


def test_mkl_mode_never_measures_onednn_and_onednn_mode_measures_nothing():
    _, _, gm, _, _ = _plan()
    plan = DISPATCH.plan(gm)
    asked = []
    timer = _fake_timer({r: {"mkl": 10, "mkl_cols": 1, "onednn": 1} for r in ("linear", "linear_bias", "addmm")}, asked)
    chosen, _ = gemm.select_gemm_kernels(plan, "mkl", timer=timer)
    assert all("onednn" not in kernels for _, kernels in asked)
    assert {rule.name for rule, _ in chosen.values()} == {"linear_bias", "addmm", "linear"}

    def refuse(shape, kernels):
        raise AssertionError("onednn mode measured")
    chosen, report = gemm.select_gemm_kernels(plan, "onednn", timer=refuse)
    assert {rule.name for rule, _ in chosen.values()} == {"linear_bias_onednn", "addmm_onednn", "linear_onednn"}
    assert all("us" not in r for r in report)


def test_unknown_mode_is_refused_with_the_valid_ones():
    with pytest.raises(UnknownNameError, match="GEMM kernel mode 'fast'.*measure, mkl, onednn"):
        gemm.select_gemm_kernels({}, "fast")
    with pytest.raises(UnknownNameError, match="CpuOptions.gemm_kernels 'fast'.*measure, mkl, onednn"):
        CpuOptions(gemm_kernels="fast")


def test_real_measurement_times_every_candidate():
    shape = gemm.GemmShape("linear", 8, 32, WIDE)
    us = gemm.measure(shape, gemm.candidates(shape, "measure"))
    assert list(us) == ["mkl", "mkl_cols", "onednn"] and all(t > 0 for t in us.values())


@pytest.mark.parametrize("mode", ["mkl", "onednn", "measure"])
def test_each_mode_compiles_and_matches_eager(tmp_path, mode):
    model, x, gm, n, weights = _plan()
    lowered = lower_partition(gm, n, weights, CpuTarget(gemm_kernels=mode))
    (got,) = run_lowered(lowered, weights, (x,), tmp_path)
    with torch.no_grad():
        want = model(x)
    if mode == "mkl":
        # Eager's kernel, whole or in column blocks: bitwise eager's GEMMs.
        assert torch.equal(got, want)
    else:
        # oneDNN sums in another order: fp32 tolerance (assert_close's defaults, rtol 1.3e-6, atol 1e-5).
        torch.testing.assert_close(got, want)
    functions = set(lowered.spec["report"]["dispatched"])
    if mode == "onednn":
        assert functions == {"kiln.linear_bias_onednn", "kiln.addmm_onednn", "kiln.linear_onednn"}
    assert lowered.spec["report"]["gemm_kernels"] and lowered.spec["dispatch_abi"] == tvm_dispatch.ABI


@pytest.mark.parametrize("block", [0, 1024])
def test_runtime_gemms_in_column_blocks_are_bitwise_eager(block):
    torch.manual_seed(0)
    x, w, b = torch.randn(16, 64), torch.randn(2 * 1024 + 100, 64), torch.randn(2 * 1024 + 100)
    out = torch.empty(16, w.shape[0])
    tvm_dispatch.linear(x, w, block, out)
    assert torch.equal(out, torch.mm(x, w.t()))
    tvm_dispatch.linear_bias(x, w, b, block, out)
    assert torch.equal(out, nn.functional.linear(x, w, b))
    w_kn = w.t().contiguous()
    tvm_dispatch.addmm(b, x, w_kn, block, out)
    assert torch.equal(out, torch.addmm(b, x, w_kn))


def test_runtime_onednn_gemms_match_eager_within_fp32_tolerance():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 64), torch.randn(300, 64) * 0.1, torch.randn(300)
    want = nn.functional.linear(x, w, b)
    for got in (torch.from_dlpack(tvm_dispatch.linear_bias_onednn(x, w, b)),
                torch.from_dlpack(tvm_dispatch.addmm_onednn(b, x.view(16, 64), w.t().contiguous())).view(2, 8, 300)):
        torch.testing.assert_close(got, want)
        assert got.data_ptr() % 64 == 0  # TVM's kernels read it
    torch.testing.assert_close(torch.from_dlpack(tvm_dispatch.linear_onednn(x, w)), x @ w.t())
