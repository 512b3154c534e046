"""bf16 linears on the ``cpu`` target run oneDNN on weights packed once at load (``tvm_dispatch.pack_bf16_weights``).

Checked: the packed kernel runs, matches eager bf16 within bf16 tolerance, a NaN stays in its own row (oneDNN's
bf16 inner product spread it into the row before: FINDINGS F2, so such inputs run eager's kernel), and a weight
changed in place after loading is read as it is now (the packed copy is stale then and not used).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kiln
from kiln.passes import lower_precision
from kiln.runtime.kernels import tvm_dispatch

from packed_weights import check_packed_after_fresh_load

pytestmark = pytest.mark.skipif(not lower_precision.bf16_units()[0], reason="no bf16 units")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 16, bias=False)).to(torch.bfloat16).eval()


def test_bf16_linears_run_on_packed_weights_within_bf16_tolerance(monkeypatch):
    m, x = _model(), torch.randn(2, 32, 24, dtype=torch.bfloat16)
    cm = kiln.compile(m, (x,))
    (part,) = cm.manifest["partitions"]
    assert len(part["spec"]["packed_bf16_weights"]) == 2
    assert {g["kernel"] for g in part["report"]["gemm_kernels"]} == {"onednn"}
    calls = []
    real = tvm_dispatch._packed
    monkeypatch.setattr(tvm_dispatch, "_packed", lambda w, rows: calls.append(real(w, rows)) or calls[-1])
    got = cm(x)
    assert len(calls) == 2 and all(c is not None for c in calls)
    with torch.no_grad():
        torch.testing.assert_close(got, m(x))  # bf16 tolerance


def test_a_nan_stays_in_its_row():
    m, x = _model(), torch.randn(1, 32, 24, dtype=torch.bfloat16)
    cm = kiln.compile(m, (x,))
    x[0, 5, 3] = float("nan")
    got = cm(x)
    assert got[0, 5].isnan().all()
    assert not got[0, :5].isnan().any() and not got[0, 6:].isnan().any()
    with torch.no_grad():
        torch.testing.assert_close(got, m(x), equal_nan=True)


def test_a_weight_changed_in_place_after_loading_is_read_as_it_is_now():
    m, x = _model(), torch.randn(1, 32, 24, dtype=torch.bfloat16)
    cm = kiln.compile(m, (x,))
    before = cm(x)
    name = cm.manifest["partitions"][0]["spec"]["packed_bf16_weights"][-1]
    cm.artifact.weights[name].mul_(2)  # the library's bound view reads this very tensor
    got = cm(x)
    torch.testing.assert_close(got, before * 2, rtol=1.6e-2, atol=1e-2)


def test_packed_bf16_weights_survive_save_and_load_in_a_fresh_process(tmp_path, fresh_python):
    
    m, x = _model(), torch.randn(1, 32, 24, dtype=torch.bfloat16)
    cm = kiln.compile(m, (x,))
    got = cm(x)
    check_packed_after_fresh_load(fresh_python, cm, x, got, tmp_path, count=2)
