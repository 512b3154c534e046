import pytest
import torch
from torch import nn

from kiln.errors import KilnError, PassError, UnknownNameError, VerificationError
from kiln.ir import trace
from kiln.passes import (Drift, Pass, PassContext, PassManager, PassResult, Skip, Snapshot, StopAfter, Verify,
                         get_pipeline, register_pass, registered_passes)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return trace(Tiny().eval(), (torch.randn(2, 4),))


@pytest.fixture
def scratch_passes():
    """Register test passes for one test only."""
    from kiln.passes import base

    before = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(before)


def test_failing_pass_is_named_with_the_passes_before_it(graph, scratch_passes):
    @register_pass
    class Explode(Pass):
        name = "explode"

        def run(self, graph, ctx):
            raise RuntimeError("boom")

    pm = PassManager(["remove_trace_asserts", "eliminate_dead_code", "explode"])
    with pytest.raises(PassError) as e:
        pm.run(graph, PassContext())
    assert "pass 'explode' failed: RuntimeError: boom" in str(e.value)
    assert "passes run before it: remove_trace_asserts, eliminate_dead_code" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_duplicate_pass_name_is_an_error(scratch_passes):
    with pytest.raises(KilnError, match="a pass named 'fold_constants' is already registered"):
        @register_pass
        class Again(Pass):
            name = "fold_constants"

            def run(self, graph, ctx):
                return PassResult(False)


def test_unknown_pass_and_pipeline_list_known_names():
    with pytest.raises(UnknownNameError, match="unknown pass 'nope'; known passes: .*fold_constants"):
        PassManager(["nope"])
    with pytest.raises(UnknownNameError, match="unknown pipeline 'gpu9'; known pipelines: cpu, none"):
        get_pipeline("gpu9")


def test_provenance_records_creating_and_rewriting_pass(graph, scratch_passes):
    @register_pass
    class ReluToGelu(Pass):
        name = "relu_to_gelu"

        def run(self, graph, ctx):
            for n in list(graph.fx.nodes):
                if n.target == torch.ops.aten.relu.default:
                    with graph.fx.inserting_after(n):
                        new = graph.fx.call_function(torch.ops.aten.gelu.default, (n.args[0],))
                    n.replace_all_uses_with(new)
                    graph.fx.erase_node(n)
                    return PassResult(True)
            return PassResult(False)

    (rec,) = PassManager(["relu_to_gelu"], [Verify()]).run(graph, PassContext())
    gelu = graph.node(rec.added[0])
    assert graph.meta(gelu).created_by == "relu_to_gelu"
    assert rec.removed == ["relu"]
    mul = next(n for n in graph.fx.nodes if n.target == torch.ops.aten.mul.Tensor)
    assert rec.rewritten == [mul.name]
    assert graph.meta(mul).rewritten_by == ["relu_to_gelu"]
    assert graph.meta(graph.node("linear")).created_by == "trace"
    assert str(graph.meta(gelu).types[0]) == "f32[2, 4]"  # types were re-propagated


def test_verify_instrument_catches_a_pass_that_breaks_the_graph(graph, scratch_passes):
    @register_pass
    class DropWeight(Pass):
        name = "drop_weight_entry"

        def run(self, graph, ctx):
            graph.weights["ghost"] = torch.zeros(1)
            return PassResult(True)

    with pytest.raises(PassError, match="drop_weight_entry.*weights with no placeholder: \\['ghost'\\]") as e:
        PassManager(["drop_weight_entry"], [Verify()]).run(graph, PassContext())
    assert isinstance(e.value.__cause__, VerificationError)


def test_requires_is_checked(graph, scratch_passes):
    @register_pass
    class NeedsFold(Pass):
        name = "needs_fold"
        requires = ("fold_constants",)

        def run(self, graph, ctx):
            return PassResult(False)

    with pytest.raises(PassError, match="'needs_fold' requires \\['fold_constants'\\]"):
        PassManager(["needs_fold"]).run(graph, PassContext())
    PassManager(["fold_constants", "needs_fold"]).run(graph, PassContext())


def test_skip_stop_after_snapshot_and_drift(graph):
    x = torch.randn(2, 4)
    reference = graph.run([x])
    snap = Snapshot()
    pm = PassManager(get_pipeline("cpu"), [Skip(["eliminate_dead_code"]), StopAfter("eliminate_dead_code"),
                                           snap, Drift([x], reference)])
    records = pm.run(graph, PassContext())
    assert [r.name for r in records] == ["remove_trace_asserts", "eliminate_dead_code", "fold_constants",
                                         "prune_rows", "annotate_regions", "quantize_nested", "extract_outliers",
                                         "lower_precision", "merge_linears", "place"]
    assert [r.skipped for r in records] == [False, True, False, False, False, False, False, False, False, False]
    assert snap.initial.startswith("graph Tiny(")
    assert all(r.extra["drift"] == 0.0 for r in records if not r.skipped)
    assert records[-1].extra["ir"] == graph.text()
    assert "placement=cpu" in records[-1].extra["ir"] and "placement" not in records[0].extra["ir"]

    records = PassManager(get_pipeline("cpu"), [StopAfter("eliminate_dead_code")]).run(graph, PassContext())
    assert [r.name for r in records] == ["remove_trace_asserts", "eliminate_dead_code"]
    with pytest.raises(UnknownNameError):
        Skip(["no_such_pass"])


def test_every_registered_pass_is_in_a_pipeline_or_documented():
    assert set(get_pipeline("cpu")) <= set(registered_passes())
