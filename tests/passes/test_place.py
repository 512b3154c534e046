"""Placement as a pass: recorded like any pass, cost-driven where a backend prices a node, earlier placements kept."""
import pytest
import torch
from torch import nn

import kiln
from kiln.backends import base as backends_base
from kiln.backends.pytorch import TorchBackend
from kiln.ir.tracing import trace
from kiln.passes import PassContext, PassManager, get_pipeline


class Alternating(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


class CheapRelu(TorchBackend):
    """The torch kernels, priced: relu is cheap here, nothing else has a cost."""

    name = "cheap_relu"

    def cost(self, node):
        return 1.0 if node.target == torch.ops.aten.relu.default else None


@pytest.fixture
def costed(monkeypatch):
    monkeypatch.setitem(backends_base._BACKENDS, "cheap_relu", CheapRelu)
    monkeypatch.setitem(backends_base.TARGETS, "costed", ["torch", "cheap_relu"])  # first-fit would pick torch


UNPLACED = [p for p in get_pipeline("torch") if p != "place"]


def test_the_place_pass_ends_the_default_pipelines():
    for target in ("cpu", "torch"):
        assert get_pipeline(target)[-1] == "place"


def test_the_place_pass_is_recorded_like_any_pass(tmp_path):
    torch.manual_seed(0)
    m, x = Alternating().eval(), torch.randn(3, 4)
    cm = kiln.compile(m, (x,), target="torch")
    (record,) = [p for p in cm.manifest["passes"] if p["name"] == "place"]
    assert record["stats"] == {"on_torch": 3} and record["annotated"] == 3 and record["modified"]
    torch.testing.assert_close(cm(x), m(x))


def test_a_backend_cost_chooses_over_first_fit(costed):
    torch.manual_seed(0)
    m, x = Alternating().eval(), torch.randn(3, 4)
    cm = kiln.compile(m, (x,), target="costed", passes=get_pipeline("torch"))
    (record,) = [p for p in cm.manifest["passes"] if p["name"] == "place"]
    assert record["stats"] == {"on_cheap_relu": 1, "on_torch": 2}
    assert [t["backend"] for t in cm.manifest["partitions"]] == ["torch", "cheap_relu", "torch"]
    torch.testing.assert_close(cm(x), m(x))
    first_fit = kiln.compile(m, (x,), target="costed", passes=UNPLACED)  # lowering places the same
    assert [t["backend"] for t in first_fit.manifest["partitions"]] == ["torch", "cheap_relu", "torch"]


def test_a_placement_set_by_an_earlier_pass_is_kept_and_the_record_names_the_nodes_placed(costed):
    torch.manual_seed(0)
    m, x = Alternating().eval(), torch.randn(3, 4)
    graph = trace(m, (x,))
    (relu,) = [n for n in graph.compute_nodes() if n.target == torch.ops.aten.relu.default]
    graph.meta(relu).placement = "torch"  # as a pass before placement would set it
    (record,) = PassManager(["place"]).run(graph, PassContext(target="costed"))
    assert graph.meta(relu).placement == "torch"
    assert all(graph.meta(n).placement == "torch" for n in graph.compute_nodes())
    # the record says which nodes the pass placed (kiln inspect shows it): all but the one placed before
    assert sorted(record.annotated) == sorted(n.name for n in graph.compute_nodes() if n is not relu)
