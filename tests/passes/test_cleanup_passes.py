"""Golden-IR tests of the clean-up passes, each with an eager check."""
import torch
from torch import nn

from kiln.ir import trace
from kiln.passes import PassContext, PassManager


def run(graph, *names):
    return PassManager(list(names)).run(graph, PassContext())


class WithDeadWork(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return (x @ self.w).float()  # `.float()` on f32 traces to an assert


def with_dead_node():
    """torch.export already drops dead Python code, so add a dead node the way a pass would leave one."""
    torch.manual_seed(0)
    m, x = WithDeadWork().eval(), torch.randn(2, 4)
    g = trace(m, (x,))
    matmul = g.node("matmul")
    with g.fx.inserting_after(matmul):
        g.fx.call_function(torch.ops.aten.exp.default, (matmul,))
    g.propagate_types()
    return m, x, g


def test_eliminate_dead_code_golden():
    m, x, g = with_dead_node()
    assert "aten.exp" in g.text() and "p_unused" in g.text()
    (rec,) = run(g, "eliminate_dead_code")
    assert rec.stats == {"nodes": 1, "weights": 1}
    assert g.text() == """\
graph WithDeadWork(%x: f32[2, 4]) {
  weight %p_w: f32[4, 4]
  %matmul: f32[2, 4] = aten.matmul(%x, %p_w)
  %_assert_tensor_metadata: () = aten._assert_tensor_metadata(%matmul, None, None, f32, device=cpu, layout=torch.strided)
  return [%matmul]
}
"""
    torch.testing.assert_close(g(x), m(x))
    assert run(g, "eliminate_dead_code")[0].modified is False


def test_remove_trace_asserts_golden():
    torch.manual_seed(0)
    m, x = WithDeadWork().eval(), torch.randn(2, 4)
    g = trace(m, (x,))
    (rec,) = run(g, "remove_trace_asserts")
    assert rec.stats == {"asserts": 1}
    assert "_assert_tensor_metadata" not in g.text()
    torch.testing.assert_close(g(x), m(x))


class WeightOnlyMath(nn.Module):
    """``w.t() * 2 + arange`` depends on no input: it should become one weight."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        k = self.w.t() * 2 + torch.arange(4, dtype=torch.float32)
        return torch.relu(x @ k)


def test_fold_constants_golden():
    torch.manual_seed(0)
    m, x = WeightOnlyMath().eval(), torch.randn(2, 4)
    g = trace(m, (x,))
    (rec,) = run(g, "fold_constants")
    assert rec.stats == {"folded": 1, "nodes_removed": 4}
    assert g.text() == """\
graph WeightOnlyMath(%x: f32[2, 4]) {
  weight %p_w: f32[4, 4]
  weight %_folded_add: f32[4, 4]
  %matmul: f32[2, 4] = aten.matmul(%x, %_folded_add)
  %relu: f32[2, 4] = aten.relu(%matmul)
  return [%relu]
}
"""
    torch.testing.assert_close(g.weights["_folded_add"], m.w.detach().t() * 2 + torch.arange(4.0))
    torch.testing.assert_close(g(x), m(x))
    # the original weight is now unused; dead-code elimination removes it
    run(g, "eliminate_dead_code")
    assert "p_w" not in g.weights


class BigMask(nn.Module):
    """A weight-only value far larger than its inputs is left to run time."""

    def forward(self, x):
        n = 512
        mask = torch.ones(n, n).tril()
        return x @ mask


def test_fold_constants_keeps_values_larger_than_their_inputs():
    x = torch.randn(1, 512)
    g = trace(BigMask(), (x,))
    (rec,) = run(g, "fold_constants")
    assert rec.stats["folded"] == 0
    assert "aten.tril" in g.text()
    torch.testing.assert_close(g(x), BigMask()(x))


class RandomNoise(nn.Module):
    def forward(self, x):
        return x + torch.rand(4)


def test_fold_constants_never_folds_random_ops():
    g = trace(RandomNoise(), (torch.randn(4),))
    (rec,) = run(g, "fold_constants")
    assert rec.stats["folded"] == 0 and "aten.rand" in g.text()
