"""f32 linears on weights packed once at load: for MKL's sgemm (``mkl_packed``, ``tvm_dispatch.pack_f32_weights``)
and for oneDNN's inner product (``onednn_packed``, ``tvm_dispatch.pack_onednn_f32_weights``).

Checked for each: the selection offers the packed kernel only for linears on constant weights; the runtime
functions match eager within fp32 tolerance on the packed copy (oneDNN's: bitwise its plain call's) and fall back
to the plain kernel when there is none (another row count, a weight changed in place); a NaN or inf stays in its
row; a compiled model's packed weights are listed in the artifact, packed again when a fresh process loads it,
and give the same result there. (A manifest naming a packed weight the partition lacks is refused:
tests/runtime/test_artifact_validation.py.)
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

_onednn = torch.ops.mkldnn._linear_pointwise


class Kind:
    """One packed kernel: its name, how it packs, its runtime functions, its spec field, the plain kernel it falls
    back to."""

    def __init__(self, name, available, pack, layout, functions, field, plain):
        self.name, self.available, self.pack, self.layout = name, available, pack, layout
        self.linear, self.linear_bias = functions
        self.field, self.plain = field, plain


KINDS = {
    "mkl_packed": Kind("mkl_packed", torch.backends.mkl.is_available(), tvm_dispatch.pack_f32_weights, "mkl",
                       (tvm_dispatch.linear_mkl_packed, tvm_dispatch.linear_bias_mkl_packed), "packed_f32_weights",
                       lambda x, w, b: torch.addmm(b, x, w.t())),
    "onednn_packed": Kind("onednn_packed", torch.backends.mkldnn.is_available(), tvm_dispatch.pack_onednn_f32_weights,
                          "onednn", (tvm_dispatch.linear_onednn_packed, tvm_dispatch.linear_bias_onednn_packed),
                          "packed_onednn_f32_weights", lambda x, w, b: _onednn(x, w, b, "none", [], "")),
}


@pytest.fixture(params=list(KINDS))
def kind(request) -> Kind:
    k = KINDS[request.param]
    if not k.available:
        pytest.skip(f"PyTorch built without the library {k.name} runs on")
    return k


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128, bias=False)).eval()


def _packed_calls(monkeypatch) -> list:
    calls = []
    real = tvm_dispatch._packed
    monkeypatch.setattr(tvm_dispatch, "_packed", lambda w, layout: calls.append(real(w, layout)) or calls[-1])
    return calls


@pytest.fixture
def always_packed(monkeypatch, kind):
    """The selection picks ``kind`` wherever it is a candidate (not memoised across tests)."""
    monkeypatch.setattr(gemm, "_MEMO", {})
    monkeypatch.setattr(gemm, "choose", lambda us: kind.name if kind.name in us else "mkl")
    return kind


def test_packed_kernel_is_a_candidate_only_for_linears_on_constant_weights(kind):
    torch.manual_seed(0)
    gm, n, _ = export_partition(_model(), (torch.randn(128, 128),))
    plan = DISPATCH.plan(gm)
    weights = frozenset(p for p in gm.graph.nodes if p.op == "placeholder")
    asked = []

    def timer(shape, kernels):
        asked.append((shape.rule, shape.constant_weight, kernels))
        return {k: 1.0 if k == kind.name else 10.0 for k in kernels}
    chosen, report = gemm.select_gemm_kernels(plan, "measure", timer=timer, constants=weights)
    assert all(kind.name in kernels for _, constant, kernels in asked if constant)
    assert {rule.name for rule, _ in chosen.values() if "linear" in rule.name} == {
        f"linear_bias_{kind.name}", f"linear_{kind.name}"}
    assert {r["kernel"] for r in report} == {kind.name}
    # Not on a weight computed at run time, not in the bitwise-eager mode, not for bf16.
    assert kind.name not in gemm.candidates(gemm.GemmShape("linear", 128, 512, 512, "f32", False), "measure")
    assert kind.name not in gemm.candidates(gemm.GemmShape("linear", 128, 512, 512, "f32", True), "mkl")
    assert kind.name not in gemm.candidates(gemm.GemmShape("linear", 128, 512, 512, "bf16", True), "measure")
    assert kind.name not in gemm.candidates(gemm.GemmShape("addmm", 128, 512, 512, "f32", True), "measure")
    # Not below PACK_MIN_MACS (nothing to save, and MKL's packed sgemm still runs its threads).
    assert kind.name not in gemm.candidates(gemm.GemmShape("linear", 16, 64, 64, "f32", True), "measure")
    assert kind.name in gemm.candidates(gemm.GemmShape("linear", 128, 128, 128, "f32", True), "measure")


def test_real_measurement_times_the_packed_kernels():
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        pytest.skip("PyTorch built without MKL or oneDNN")
    shape = gemm.GemmShape("linear_bias", 128, 128, 128, "f32", True)
    us = gemm.measure(shape, gemm.candidates(shape, "measure"))
    assert list(us) == ["mkl", "mkl_packed", "onednn", "onednn_packed"] and all(t > 0 for t in us.values())


def test_runtime_packed_linear_matches_eager_and_falls_back_without_a_packed_weight(monkeypatch, kind):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 64), torch.randn(300, 64) * 0.1, torch.randn(300)
    calls = _packed_calls(monkeypatch)
    assert kind.pack([(w, 16)]) == 1
    got = torch.from_dlpack(kind.linear_bias(x, w, b))
    assert calls[-1] is not None and got.data_ptr() % 64 == 0
    torch.testing.assert_close(got, nn.functional.linear(x, w, b))  # fp32 tolerance
    torch.testing.assert_close(torch.from_dlpack(kind.linear(x, w)), x @ w.t())
    if kind.name == "onednn_packed":  # the plain call's result, bitwise
        assert torch.equal(got.view(16, 300), kind.plain(x.view(16, 64), w, b))
    # Another row count: no packed copy for it, the plain kernel, bitwise its result.
    x3 = torch.randn(3, 64)
    assert torch.equal(torch.from_dlpack(kind.linear_bias(x3, w, b)), kind.plain(x3, w, b))
    assert calls[-1] is None
    # Changed in place after packing: the packed copy is stale; the weight is read as it is now.
    w.mul_(2)
    got = torch.from_dlpack(kind.linear_bias(x, w, b))
    assert calls[-1] is None
    torch.testing.assert_close(got, nn.functional.linear(x, w, b))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("m,k,n", [(16, 64, 32), (32, 5, 7), (33, 384, 2048), (128, 1536, 384)])
def test_a_nan_or_inf_stays_in_its_row(kind, value, m, k, n):
    """Unlike oneDNN's bf16 inner product (F2), neither f32 kernel spreads a non-finite input into another row."""
    torch.manual_seed(0)
    w, b = torch.randn(n, k), torch.randn(n)
    kind.pack([(w, m)])
    for row in sorted({0, m // 2, m - 1}):
        x = torch.randn(m, k)
        x[row, k // 2] = value
        got = torch.from_dlpack(kind.linear_bias(x, w, b))
        assert not got[row].isfinite().any()
        others = torch.cat([got[:row], got[row + 1:]])
        assert others.isfinite().all()
        torch.testing.assert_close(others, torch.cat([x[:row], x[row + 1:]]) @ w.t() + b, rtol=1e-4, atol=1e-3)


def test_a_compiled_model_packs_its_weights_and_they_survive_save_and_load_in_a_fresh_process(
        always_packed, monkeypatch, tmp_path, fresh_python):
    kind = always_packed
    m, x = _model(), torch.randn(2, 64, 128)
    cm = kiln.compile(m, (x,))
    (part,) = cm.manifest["partitions"]
    assert sorted(rows for _, rows in part["spec"][kind.field]) == [128, 128]
    assert {g["kernel"] for g in part["report"]["gemm_kernels"]} == {kind.name}
    calls = _packed_calls(monkeypatch)
    got = cm(x)
    assert len(calls) == 2 and all(c is not None for c in calls)
    with torch.no_grad():
        torch.testing.assert_close(got, m(x))
    check_packed_after_fresh_load(fresh_python, cm, x, got, tmp_path, count=2)


def test_pack_weights_false_never_packs_and_a_bad_value_is_refused(always_packed):
    from kiln.backends.cpu import CpuOptions
    from kiln.errors import KilnError

    kind = always_packed
    m, x = _model(), torch.randn(2, 64, 128)
    cm = kiln.compile(m, (x,), options=kiln.CompileOptions(backend_options={"cpu": CpuOptions(pack_weights=False)}))
    (part,) = cm.manifest["partitions"]
    assert kind.field not in part["spec"]
    assert kind.name not in {g["kernel"] for g in part["report"]["gemm_kernels"]}
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x))
    with pytest.raises(KilnError, match="CpuOptions.pack_weights must be True or False, not 'no'"):
        CpuOptions(pack_weights="no")
