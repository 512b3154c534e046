"""f32 linears on weights packed once at load for MKL's sgemm (``tvm_dispatch.pack_f32_weights``).

Checked: the selection offers the packed kernel only for linears on constant weights; the runtime functions
match eager within fp32 tolerance on the packed copy and fall back to eager's kernel when there is none (another
row count, a weight changed in place); a NaN stays in its row; a compiled model's packed weights are listed in
the artifact, packed again when a fresh process loads it, and give the same result there. (A manifest naming a
packed weight the partition lacks is refused: tests/runtime/test_artifact_validation.py.)
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln
from kiln.backends.cpu import gemm
from kiln.backends.cpu.dispatch import DISPATCH
from kiln.runtime.kernels import tvm_dispatch

from packed_weights import check_packed_after_fresh_load

from test_tvm_lowering import export_partition

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="PyTorch built without MKL")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128, bias=False)).eval()


def _packed_calls(monkeypatch) -> list:
    calls = []
    real = tvm_dispatch._packed
    monkeypatch.setattr(tvm_dispatch, "_packed", lambda w, rows: calls.append(real(w, rows)) or calls[-1])
    return calls


@pytest.fixture
def always_packed(monkeypatch):
    """The selection picks ``mkl_packed`` wherever it is a candidate (not memoised across tests)."""
    monkeypatch.setattr(gemm, "_MEMO", {})
    monkeypatch.setattr(gemm, "choose", lambda us: "mkl_packed" if "mkl_packed" in us else "mkl")


def test_packed_kernel_is_a_candidate_only_for_linears_on_constant_weights():
    torch.manual_seed(0)
    gm, n, _ = export_partition(_model(), (torch.randn(128, 128),))
    plan = DISPATCH.plan(gm)
    weights = frozenset(p for p in gm.graph.nodes if p.op == "placeholder")
    asked = []

    def timer(shape, kernels):
        asked.append((shape.rule, shape.constant_weight, kernels))
        return {k: 1.0 if k == "mkl_packed" else 10.0 for k in kernels}
    chosen, report = gemm.select_gemm_kernels(plan, "measure", timer=timer, constants=weights)
    assert all("mkl_packed" in kernels for _, constant, kernels in asked if constant)
    assert {rule.name for rule, _ in chosen.values() if "linear" in rule.name} == {
        "linear_bias_mkl_packed", "linear_mkl_packed"}
    assert {r["kernel"] for r in report} == {"mkl_packed"}
    # Not on a weight computed at run time, not in the bitwise-eager mode, not for bf16.
    assert "mkl_packed" not in gemm.candidates(gemm.GemmShape("linear", 128, 512, 512, "f32", False), "measure")
    assert "mkl_packed" not in gemm.candidates(gemm.GemmShape("linear", 128, 512, 512, "f32", True), "mkl")
    assert "mkl_packed" not in gemm.candidates(gemm.GemmShape("linear", 128, 512, 512, "bf16", True), "measure")
    assert "mkl_packed" not in gemm.candidates(gemm.GemmShape("addmm", 128, 512, 512, "f32", True), "measure")
    # Not below PACK_MIN_MACS (nothing to save, and MKL's packed sgemm still runs its threads).
    assert "mkl_packed" not in gemm.candidates(gemm.GemmShape("linear", 16, 64, 64, "f32", True), "measure")
    assert "mkl_packed" in gemm.candidates(gemm.GemmShape("linear", 128, 128, 128, "f32", True), "measure")


def test_real_measurement_times_the_packed_kernel():
    shape = gemm.GemmShape("linear_bias", 128, 128, 128, "f32", True)
    us = gemm.measure(shape, gemm.candidates(shape, "measure"))
    assert list(us) == ["mkl", "mkl_packed", "onednn"] and all(t > 0 for t in us.values())


def test_runtime_packed_linear_matches_eager_and_falls_back_without_a_packed_weight(monkeypatch):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 64), torch.randn(300, 64) * 0.1, torch.randn(300)
    calls = _packed_calls(monkeypatch)
    assert tvm_dispatch.pack_f32_weights([(w, 16)]) == 1
    got = torch.from_dlpack(tvm_dispatch.linear_bias_mkl_packed(x, w, b))
    assert calls[-1] is not None and got.data_ptr() % 64 == 0
    torch.testing.assert_close(got, nn.functional.linear(x, w, b))  # fp32 tolerance
    torch.testing.assert_close(torch.from_dlpack(tvm_dispatch.linear_mkl_packed(x, w)), x @ w.t())
    # Another row count: no packed copy for it, eager's kernel, bitwise eager.
    x3 = torch.randn(3, 64)
    assert torch.equal(torch.from_dlpack(tvm_dispatch.linear_bias_mkl_packed(x3, w, b)), torch.addmm(b, x3, w.t()))
    assert calls[-1] is None
    # Changed in place after packing: the packed copy is stale; the weight is read as it is now.
    w.mul_(2)
    got = torch.from_dlpack(tvm_dispatch.linear_bias_mkl_packed(x, w, b))
    assert calls[-1] is None
    torch.testing.assert_close(got, nn.functional.linear(x, w, b))


def test_a_nan_stays_in_its_row():
    torch.manual_seed(0)
    x, w = torch.randn(16, 64), torch.randn(32, 64)
    tvm_dispatch.pack_f32_weights([(w, 16)])
    x[5, 3] = float("nan")
    got = torch.from_dlpack(tvm_dispatch.linear_mkl_packed(x, w))
    assert got[5].isnan().all() and not got[:5].isnan().any() and not got[6:].isnan().any()


def test_a_compiled_model_packs_its_weights_and_they_survive_save_and_load_in_a_fresh_process(
        always_packed, monkeypatch, tmp_path, fresh_python):
    m, x = _model(), torch.randn(2, 64, 128)
    cm = kiln.compile(m, (x,))
    (part,) = cm.manifest["partitions"]
    assert sorted(rows for _, rows in part["spec"]["packed_f32_weights"]) == [128, 128]
    assert {g["kernel"] for g in part["report"]["gemm_kernels"]} == {"mkl_packed"}
    calls = _packed_calls(monkeypatch)
    got = cm(x)
    assert len(calls) == 2 and all(c is not None for c in calls)
    with torch.no_grad():
        torch.testing.assert_close(got, m(x))
    check_packed_after_fresh_load(fresh_python, cm, x, got, tmp_path, count=2)


def test_pack_weights_false_never_packs_and_a_bad_value_is_refused(always_packed):
    from kiln.backends.cpu import CpuOptions
    from kiln.errors import KilnError

    m, x = _model(), torch.randn(2, 64, 128)
    cm = kiln.compile(m, (x,), options=kiln.CompileOptions(backend_options={"cpu": CpuOptions(pack_weights=False)}))
    (part,) = cm.manifest["partitions"]
    assert "packed_f32_weights" not in part["spec"]
    assert "mkl_packed" not in {g["kernel"] for g in part["report"]["gemm_kernels"]}
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x))
    with pytest.raises(KilnError, match="CpuOptions.pack_weights must be True or False, not 'no'"):
        CpuOptions(pack_weights="no")
