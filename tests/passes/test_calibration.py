"""Calibration: passes get real inputs and a calibration set, and activation statistics computed from them."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from kiln.api import Compilation, CompileOptions
from kiln.errors import InputMismatchError, KilnError
from kiln.ir import trace
from kiln.passes import Pass, PassContext, PassResult, calibration, get_pipeline

aten = torch.ops.aten


class LinearRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, -1.0]))

    def forward(self, x):
        return torch.relu(self.fc(x))


X1 = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.0]])
X2 = torch.tensor([[-2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


class ReadStats(Pass):
    """A pass that only reads activation statistics (twice, to see the cache) and keeps what it got."""

    name = "test_read_stats"

    def __init__(self, **kwargs):
        self.kwargs, self.seen = kwargs, []

    def run(self, graph, ctx):
        stats = ctx.activation_stats(graph, **self.kwargs)
        assert ctx.activation_stats(graph, **self.kwargs) is stats
        self.seen.append((stats, {n.target: n.name for n in graph.compute_nodes()}, ctx))
        return PassResult(False, {"nodes": len(stats)})


def compile_reading(model, inputs, calibration_set=None, **kwargs):
    reader = ReadStats(**kwargs)
    c = Compilation("cpu", passes=[*get_pipeline("cpu"), reader], options=CompileOptions(calibration=calibration_set))
    c.trace(model, inputs)
    c.optimize()
    return reader


def test_statistics_of_a_linear_match_values_computed_by_hand():
    reader = compile_reading(LinearRelu(), (X1,), [(X1,), (X2,)], bins=5)
    (stats, by_target, _), = reader.seen
    assert stats.samples == 2 and stats.bins == 5
    # fc(x1) = [[-1, -2], [2.5, -2]], fc(x2) = [[-1, -2], [0, -1]]
    fc = stats[by_target[aten.linear.default]]
    assert (fc.min, fc.max, fc.absmax, fc.count) == (-2.0, 2.5, 2.5, 8)
    assert fc.channel_absmax.tolist() == [2.5, 2.0]
    # bins of width 1 over [-2.5, 2.5]: three -2s, three -1s, one 0, none in [0.5, 1.5), one 2.5 (the last edge)
    assert fc.histogram.tolist() == [3, 3, 1, 0, 1]
    assert fc.bin_edges().tolist() == [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    relu = stats[by_target[aten.relu.default]]
    assert (relu.min, relu.max, relu.absmax) == (0.0, 2.5, 2.5)
    assert relu.channel_absmax.tolist() == [2.5, 0.0]
    assert relu.histogram.tolist() == [0, 0, 7, 0, 1]
    x = stats["x"]  # the user input itself
    assert (x.min, x.max) == (-2.0, 3.0) and x.channel_absmax.tolist() == [2.0, 2.0, 3.0]
    assert x.shape == (2, 3) and x.dtype == torch.float32


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_statistics_match_plain_torch_on_eager_activations():
    torch.manual_seed(0)
    model = MLP().eval()
    samples = [(torch.randn(5, 8),) for _ in range(3)]
    seen = []
    hook = model.fc1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        for s in samples:
            model(*s)
    hook.remove()
    acts = torch.cat(seen)
    reader = compile_reading(model, samples[0], samples, bins=64)
    (stats, by_target, _), = reader.seen
    fc1 = next(s for name, s in stats.items() if name.startswith("linear") and s.shape == (5, 16))
    assert fc1.min == acts.min().item() and fc1.max == acts.max().item()
    torch.testing.assert_close(fc1.channel_absmax, acts.abs().amax(0), rtol=0, atol=0)
    a = acts.abs().max().item()
    assert torch.equal(fc1.histogram, torch.histc(acts, 64, -a, a).long())
    assert fc1.histogram.sum().item() == acts.numel()


def test_without_a_calibration_set_the_real_example_inputs_are_used():
    reader = compile_reading(LinearRelu(), (X1,), None, histograms=False)
    (stats, by_target, ctx), = reader.seen
    assert stats.samples == 1 and stats.bins is None
    assert stats[by_target[aten.linear.default]].histogram is None
    assert stats[by_target[aten.linear.default]].channel_absmax.tolist() == [2.5, 2.0]
    # real tensors for measuring, fake ones still there for shapes
    assert torch.equal(ctx.real_inputs[0], X1) and not isinstance(ctx.real_inputs[0], FakeTensor)
    assert isinstance(ctx.example_inputs[0], FakeTensor)


def test_statistics_are_computed_once_and_only_when_asked(monkeypatch):
    calls = []
    real = calibration.collect_stats
    monkeypatch.setattr(calibration, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = Compilation("cpu", options=CompileOptions(calibration=[(X1,), (X2,)]))
    c.trace(LinearRelu(), (X1,))
    c.optimize()
    assert calls == []  # nobody asked
    g = c.graph
    ctx = PassContext(real_inputs=[X1])
    first = ctx.activation_stats(g)
    assert ctx.activation_stats(g) is first and ctx.activation_stats(g, histograms=False) is first
    assert len(calls) == 1
    relu = next(n for n in g.compute_nodes() if n.target is aten.relu.default)
    relu.target = aten.neg.default  # the graph changed: computed again
    g.propagate_types()
    assert ctx.activation_stats(g) is not first and len(calls) == 2


def test_a_progress_bar_when_asked():
    g = trace(LinearRelu(), (X1,))
    stats = calibration.collect_stats(g, [[X1], [X2]], progress=True)
    assert stats.samples == 2


@pytest.mark.parametrize("bad, index", [([(X1,), "oops"], 1), ([(X1,), 3], 1), ([7, (X1,)], 0)])
def test_an_item_that_is_not_an_input_tuple_is_named(bad, index):
    with pytest.raises(KilnError, match=rf"CompileOptions\.calibration\[{index}\] must be a tuple"):
        CompileOptions(calibration=bad)


def test_an_item_that_does_not_match_the_signature_is_named():
    options = CompileOptions(calibration=iter([(X1,), (X2,), (torch.randn(4, 3),)]))
    assert len(options.calibration) == 3  # a one-shot iterable is kept as a list
    c = Compilation("cpu", options=options)
    c.trace(LinearRelu(), (X1,))
    with pytest.raises(InputMismatchError, match=r"(?s)CompileOptions\.calibration\[2\]:.*expected f32\[2, 3\], got f32\[4, 3\]"):
        c.optimize()


@pytest.mark.parametrize("bad", [torch.randn(2, 3), 5, []])
def test_a_calibration_set_that_is_not_a_list_of_tuples_is_refused(bad):
    with pytest.raises(KilnError, match=r"CompileOptions\.calibration"):
        CompileOptions(calibration=bad)


def test_no_calibration_data_at_all():
    g = trace(LinearRelu(), (X1,))
    with pytest.raises(KilnError, match="no calibration data"):
        PassContext().activation_stats(g)
