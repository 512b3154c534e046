"""merge_linears: linears on one input run as one linear on their concatenated weights."""
import pytest
import torch
import torch.nn as nn

import kiln
from kiln.api import Compilation
from kiln import zoo

aten = torch.ops.aten


class Heads(nn.Module):
    """q, k, v on one input (with biases), a gate/up pair without bias, and linears that must stay apart."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.gate, self.up = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False)
        self.extra = nn.Linear(16, 4)  # has a bias: joins q, k, v, not gate/up, which have none
        self.other = nn.Linear(24, 16)  # reads another input

    def forward(self, x):
        a = self.q(x).sum(-1) + self.k(x).sum(-1) * self.v(x).mean(-1)
        h = torch.nn.functional.silu(self.gate(x)) * self.up(x)
        return self.other(h) + a.unsqueeze(-1) + self.extra(x).sum(-1, keepdim=True)


def _compile(model, x, target="cpu", **options):
    c = Compilation(target, options=kiln.CompileOptions(**options))
    c.trace(model, (x,))
    c.optimize()
    return c


def _linears(graph):
    return [n for n in graph.compute_nodes() if n.target is aten.linear.default]


def test_linears_on_one_input_become_one_per_bias_kind():
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 16)
    c = _compile(model, x)
    stats = next(r.stats for r in c.records if r.name == "merge_linears")
    assert stats == {"merged_linears": 6, "groups": 2}  # q, k, v, extra (biases); gate, up (none)
    linears = _linears(c.graph)
    widths = sorted(c.graph.weights[n.args[1].name].shape[0] for n in linears)
    assert widths == [16, 36, 48]  # other, q+k+v+extra, gate+up
    # the originals are gone; the merged weight is theirs stacked, with its provenance
    merged = next(n for n in linears if c.graph.weights[n.args[1].name].shape[0] == 36)
    w = c.graph.weights[merged.args[1].name]
    parts = [model.q.weight, model.k.weight, model.v.weight, model.extra.weight]
    torch.testing.assert_close(w, torch.cat(parts).detach(), rtol=0, atol=0)
    assert c.graph.weight_sources[merged.args[1].name] == "cat(q.weight, k.weight, v.weight, extra.weight)"
    assert not any(src in ("q.weight", "k.weight", "gate.weight") for src in c.graph.weight_sources.values())
    # the slices are the original results
    assert sum(n.target is aten.slice.Tensor for n in c.graph.compute_nodes()) == 6


@pytest.mark.parametrize("target", ["cpu", "torch"])
def test_merged_model_matches_eager(target):
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 16)
    cm = kiln.compile(model, (x,), target=target)
    torch.testing.assert_close(cm(x), model(x))


def test_a_weight_read_elsewhere_is_kept():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) + self.b(x) + (x @ self.a.weight)  # a.weight read by a matmul too

    torch.manual_seed(0)
    model, x = Tied().eval(), torch.randn(3, 8)
    c = _compile(model, x)
    # a.weight is read by the matmul too: merged, it would be stored twice; b alone is no group
    assert len(_linears(c.graph)) == 2
    assert {"a.weight", "b.weight"} <= set(c.graph.weight_sources.values())
    torch.testing.assert_close(c.lower()(x), model(x))


def test_a_weight_shared_by_two_inputs_is_not_stored_twice():
    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, y):
            return self.q(x) + self.k(x) + self.q(y) * self.k(y)

    torch.manual_seed(0)
    model, x, y = Siamese().eval(), torch.randn(3, 8), torch.randn(3, 8)
    c = Compilation("cpu")
    c.trace(model, (x, y))
    c.optimize()
    assert len(_linears(c.graph)) == 4
    assert sum(w.numel() for w in c.graph.weights.values()) == 2 * (8 * 8 + 8)
    torch.testing.assert_close(c.lower()(x, y), model(x, y))


def test_skipping_the_pass_keeps_the_linears_apart():
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 16)
    c = _compile(model, x, skip_passes=("merge_linears",))
    assert len(_linears(c.graph)) == 7


def test_mkl_gives_merged_columns_bitwise():
    # the numerics the docstring states: MKL's sgemm per output column does not depend on N here
    torch.manual_seed(0)
    for m, k, ns in [(128, 384, [384] * 3), (128, 512, [512, 256, 256]), (197, 768, [768] * 3)]:
        x = torch.randn(m, k)
        ws, bs = [torch.randn(n, k) for n in ns], [torch.randn(n) for n in ns]
        apart = torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)], -1)
        merged = torch.nn.functional.linear(x, torch.cat(ws), torch.cat(bs))
        torch.testing.assert_close(merged, apart, rtol=0, atol=0)


def test_llama_attention_and_swiglu_merge_and_match_eager():
    torch.manual_seed(0)
    model, inputs = zoo.MODELS["llama"]()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    cm = kiln.compile(model, inputs)
    stats = next(p["stats"] for p in cm.manifest["passes"] if p["name"] == "merge_linears")
    layers = model.config.num_hidden_layers
    assert stats == {"merged_linears": 5 * layers, "groups": 2 * layers}  # q/k/v and gate/up per layer
    want = model(*inputs).logits
    got = cm(*inputs)
    got = got.logits if hasattr(got, "logits") else got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, want)


def test_one_weight_twice_on_one_input_is_not_stored_twice():
    # found by the suite: a model applying one linear twice to one input (the weight listed twice) failed
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return torch.cat([self.a(x), self.a(x) * 2, self.b(x)], -1)

    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(3, 8)
    c = _compile(model, x)
    assert sum(w.numel() for w in c.graph.weights.values()) == 8 * 8 + 8 + 4 * 8 + 4  # a and b once each
    torch.testing.assert_close(c.lower()(x), model(x))


def test_linears_an_earlier_pass_put_on_other_queues_stay_apart():
    from kiln.passes import Pass, PassResult
    from kiln.passes.pipelines import get_pipeline

    class KOnCpu1(Pass):
        name = "k_on_cpu1"

        def run(self, graph, ctx):
            for node in graph.compute_nodes():
                if node.target is aten.linear.default and node.args[1].name == "p_k_weight":
                    graph.meta(node).queue = "cpu1"
            return PassResult(True)

    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(2, 5, 16)
    passes = get_pipeline("cpu")
    passes.insert(passes.index("merge_linears"), KOnCpu1())
    c = Compilation("cpu", passes=passes)
    c.trace(model, (x,))
    c.optimize()
    stats = next(r.stats for r in c.records if r.name == "merge_linears")
    assert stats == {"merged_linears": 5, "groups": 2}  # q, v, extra; gate, up: k stays on its queue
