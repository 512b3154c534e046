"""The seam between kiln's target-neutral TVM core (kiln/backends/tvm) and a target's parts (kiln/backends/cpu)."""
import ast
from pathlib import Path

import torch
from torch import nn

import kiln.backends.tvm as core
from kiln.backends.cpu.target import CpuTarget, host_target
from kiln.backends.tvm import LibraryDispatch, TvmTarget, lower_partition

from test_tvm_lowering import export_partition


def test_the_core_never_imports_a_target():
    for path in Path(core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert "cpu" not in module.split("."), f"{path.name} imports {module}"


class BareLlvm(TvmTarget):
    """A target with no library dispatch, no plan stages, no schedule rules and no tuning."""

    name = "bare"
    dispatch = LibraryDispatch((), abi=0)

    def target_json(self) -> dict:
        return host_target()

    def schedule_rules(self) -> list:
        return []


def test_another_target_slots_into_the_same_pipeline_with_its_own_parts():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x) * 2 + 1

    gm, n, weights = export_partition(M().eval(), (torch.randn(4, 8),))
    bare = lower_partition(gm, n, weights, BareLlvm())
    assert bare.spec["dispatch_abi"] == 0 and "mcpu" not in bare.spec
    report = bare.spec["report"]
    assert not report["dispatched"] and "gemm_kernels" not in report  # the linear became TIR
    assert "select_gemm" not in report["stage_seconds"] and "tune" not in report["stage_seconds"]
    assert all(k["schedule"] is None for k in report["kernels"])  # no rules: every kernel as legalized
    cpu = lower_partition(gm, n, weights, CpuTarget(gemm_kernels="mkl"))
    assert cpu.spec["report"]["dispatched"] == {"kiln.linear_bias": 1} and cpu.spec["mcpu"] == host_target()["mcpu"]
    assert [g["kernel"] for g in cpu.spec["report"]["gemm_kernels"]] == ["mkl"]
