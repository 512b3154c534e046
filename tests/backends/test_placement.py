"""Placement and partitioning: unsupported ops, several backends, and what is left on disk."""
import pytest
import torch
from torch import nn

import kiln
from kiln.backends import base as backends_base
from kiln.backends.base import Backend, LoweredPartition, register_backend
from kiln.backends.pytorch import TorchBackend
from kiln.errors import UnknownNameError, UnsupportedOpError


@torch.library.custom_op("kiln_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x) + 1


class Inner(nn.Module):
    def forward(self, x):
        return mystery(torch.relu(x))


def test_unsupported_op_names_node_op_and_module_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedOpError) as e:
        kiln.compile(UsesCustomOp(), (torch.randn(3),)).save(tmp_path / "art")
    msg = str(e.value)
    assert "node mystery: op kiln_test.mystery is not supported by target 'cpu'" in msg
    assert "module 'inner' (Inner)" in msg
    assert list(tmp_path.iterdir()) == []


def test_unknown_target_lists_known_ones():
    with pytest.raises(UnknownNameError, match="unknown target 'tpu'; known targets: cpu"):
        kiln.compile(nn.ReLU(), (torch.randn(2),), target="tpu")


@pytest.fixture
def relu_backend(monkeypatch):
    """A second backend that only runs relu, lowered to the same kernel format as torch."""

    class ReluOnly(Backend):
        name = "relu_only"

        def supports(self, node):
            return node.target == torch.ops.aten.relu.default

        def lower(self, partition):
            lowered = TorchBackend().lower(partition)
            return LoweredPartition(lowered.format, lowered.spec, report={"relu_only": True})

    monkeypatch.setitem(backends_base._BACKENDS, "relu_only", ReluOnly)
    monkeypatch.setitem(backends_base.TARGETS, "mixed", ["relu_only", "torch"])
    register_backend(ReluOnly)
    monkeypatch.setattr("kiln.passes.pipelines.PIPELINES", {"mixed": ["cleanup"], "cpu": ["cleanup"], "none": []})


class Alternating(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def test_nodes_split_into_runs_per_backend_and_run_in_order(relu_backend, tmp_path):
    torch.manual_seed(0)
    m, x = Alternating().eval(), torch.randn(5, 4)
    cm = kiln.compile(m, (x,), target="mixed")
    parts = cm.manifest["partitions"]
    assert [p["backend"] for p in parts] == ["torch", "relu_only", "torch", "relu_only", "torch"]
    assert parts[1]["inputs"] == parts[0]["outputs"]
    torch.testing.assert_close(cm(x), m(x))
    cm.save(tmp_path / "a")
    torch.testing.assert_close(kiln.load(tmp_path / "a")(x), m(x))


class WithFrac(nn.Module):
    """``aten.frac`` has no TVM converter: the cpu target runs it on the torch backend."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.frac(self.a(x)) * 3.0)


def test_cpu_target_falls_back_to_torch_for_ops_tvm_cannot_lower(caplog, tmp_path):
    torch.manual_seed(0)
    m, x = WithFrac().eval(), torch.randn(4, 8)
    with caplog.at_level("INFO", logger="kiln"):
        cm = kiln.compile(m, (x,))
    assert [(p["backend"], p["format"]) for p in cm.manifest["partitions"]] == [
        ("cpu", "tvm-vm"), ("torch", "torch-graph"), ("cpu", "tvm-vm")]
    assert "1 nodes not supported by 'cpu' fall back: aten.frac -> torch (x1)" in caplog.text
    torch.testing.assert_close(cm(x), m(x))
    cm.save(tmp_path / "a")
    torch.testing.assert_close(kiln.load(tmp_path / "a")(x), m(x))


def test_cpu_target_runs_dynamic_shapes_on_torch():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    cm = kiln.compile(m, (torch.randn(2, 4),), options=kiln.CompileOptions(dynamic_shapes=({0: batch},)))
    assert {p["backend"] for p in cm.manifest["partitions"]} == {"torch"}
    x = torch.randn(9, 4)
    torch.testing.assert_close(cm(x), m(x))
