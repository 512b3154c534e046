import logging

import networkx as nx
import pytest
import torch
from torch import nn

from kiln.errors import TraceError, VerificationError
from kiln.ir import trace


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x, *, bias):
        h = torch.relu(self.proj(x))
        return {"scaled": h * self.scale + bias, "pair": (h.sum(-1), x)}


def test_trace_keeps_signature_weights_and_output_structure():
    torch.manual_seed(0)
    m = TwoHeads().eval()
    x, b = torch.randn(2, 8), torch.randn(8)
    g = trace(m, (x,), {"bias": b})
    assert [i.name for i in g.signature.inputs] == ["x", "bias"]
    assert str(g.signature.inputs[0].type) == "f32[2, 8]"
    assert sorted(g.weight_sources.values()) == ["proj.bias", "proj.weight", "scale"]
    out = g(x, bias=b)
    ref = m(x, bias=b)
    assert set(out) == {"scaled", "pair"}
    torch.testing.assert_close(out["scaled"], ref["scaled"])
    torch.testing.assert_close(out["pair"][0], ref["pair"][0])
    torch.testing.assert_close(out["pair"][1], x)
    g.verify()


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def forward(self, x):
        return self.inner(x) if x.sum() > 0 else x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Branchy()

    def forward(self, x):
        return self.block(x)


def test_untraceable_model_names_module_and_reason():
    with pytest.raises(TraceError) as e:
        trace(Outer(), (torch.randn(2, 2),))
    msg = str(e.value)
    assert "could not trace Outer" in msg
    assert "submodule 'block'" in msg
    assert "data-dependent" in msg


def test_not_a_module():
    with pytest.raises(TraceError, match="nn.Module objects; got function"):
        trace(lambda x: x, (torch.randn(1),))


class CachingModel(nn.Module):
    """Mimics an HF model: returns a cache unless config.use_cache is off."""

    class Config:
        use_cache = True

    def __init__(self):
        super().__init__()
        self.config = self.Config()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if self.config.use_cache:
            return y, [torch.zeros(1)]
        return (y,)


def test_kv_cache_is_turned_off_for_tracing_and_restored(caplog):
    m = CachingModel()
    with caplog.at_level(logging.INFO, logger="kiln"):
        g = trace(m, (torch.randn(2, 4),))
    assert "use_cache=False" in caplog.text
    assert m.config.use_cache is True
    x = torch.randn(2, 4)
    out = g(x)
    assert len(out) == 1
    torch.testing.assert_close(out[0], m.lin(x))


def test_copy_is_independent_and_verify_catches_stale_types():
    g = trace(TwoHeads().eval(), (torch.randn(2, 8),), {"bias": torch.randn(8)})
    c = g.copy()
    relu = next(n for n in c.fx.nodes if n.op == "call_function" and "relu" in str(n.target))
    relu.target = torch.ops.aten.sum.default  # changes the shape without re-propagating
    assert any("relu" in str(n.target) for n in g.fx.nodes)
    with pytest.raises(VerificationError, match=f"node {relu.name}: metadata says f32\\[2, 8\\] but the value"):
        relu.meta["val"] = torch.empty(())
        c.verify()
    g.verify()


def test_networkx_view_is_the_dataflow_dag():
    g = trace(TwoHeads().eval(), (torch.randn(2, 8),), {"bias": torch.randn(8)})
    d = g.to_networkx()
    assert nx.is_directed_acyclic_graph(d)
    assert d.number_of_nodes() == len(list(g.fx.nodes))
    linear = next(n for n, a in d.nodes(data=True) if a["target"] == "aten.linear")
    assert set(d.predecessors(linear)) == {"x", "p_proj_weight", "p_proj_bias"}


def test_kiln_ir_trace_stays_the_function_after_the_tracer_module_is_imported():
    import kiln.api  # noqa: F401  (imports kiln.ir.tracing)
    import kiln.ir

    assert callable(kiln.ir.trace) and kiln.ir.trace.__module__ == "kiln.ir"


@pytest.mark.parametrize("model, x", [
    (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(12, 4)), torch.randn(2, 8)),  # shape error
    (Outer(), torch.randn(2, 2)),  # data-dependent control flow
])
def test_failed_trace_leaves_only_kilns_error_and_restores_torch_log_levels(model, x):
    """torch.export's own logs only repeat, in torch's terms and before it, what the TraceError says:
    fake tensors log a failed meta kernel's traceback (~20 lines), symbolic shapes a graph dump."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    loggers = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    keep = Keep()
    for lg in loggers:
        lg.addHandler(keep)
    try:
        with pytest.raises(TraceError, match="could not trace"):
            trace(model.eval(), (x,))
    finally:
        for lg in loggers:
            lg.removeHandler(keep)
    assert [f"{r.name}: {r.getMessage()[:80]}" for r in records] == []
    assert [lg.level for lg in loggers] == levels


class _ThreeInputs(torch.nn.Module):
    def forward(self, x, a, b):
        return x + a * 2 + b * 3


def test_the_same_tensor_given_as_two_example_inputs_compiles_a_graph_for_two_inputs():
    # torch.export traces aliased inputs as one placeholder (the other unread): every later call with two
    # different tensors came out wrong (found by the chain runner's test: frac(l0(x) + s0) read s1).
    import kiln

    s = torch.randn(3)
    for example in ((torch.randn(3), s, s), (torch.randn(3), s[:3], s)):
        cm = kiln.compile(_ThreeInputs(), example)
        x, a, b = torch.randn(3), torch.randn(3), torch.randn(3)
        torch.testing.assert_close(cm(x, a, b), _ThreeInputs()(x, a, b))
        assert {n.name for n in cm.default_program.signature.inputs} == {"x", "a", "b"}


def test_a_weight_given_as_an_example_input_stays_an_input():
    import kiln

    lin = torch.nn.Linear(3, 3, bias=False)

    class UsesWeightAndInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, w):
            return self.lin.weight + w

    cm = kiln.compile(UsesWeightAndInput(), (lin.weight.detach(),))
    w = torch.randn(3, 3)
    torch.testing.assert_close(cm(w), lin.weight.detach() + w)
