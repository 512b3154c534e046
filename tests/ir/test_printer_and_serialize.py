import json

import pytest
import torch
from torch import nn

from kiln.errors import ArtifactError
from kiln.ir import trace
from kiln.ir.serialize import graph_from_json, graph_to_json, resolve_target


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        y = self.lin(x).softmax(-1)
        return y.to(torch.float64).clamp(min=float("-inf"), max=0.5)


GOLDEN = """\
graph Small(%x: f32[2, 4]) {
  weight %p_lin_weight: f32[3, 4]
  %linear: f32[2, 3] = aten.linear(%x, %p_lin_weight)
  %softmax: f32[2, 3] = aten.softmax.int(%linear, -1)
  %_assert_tensor_metadata: () = aten._assert_tensor_metadata(%softmax, None, None, f32, device=cpu, layout=torch.strided)
  %_to_copy: f64[2, 3] = aten._to_copy(%softmax, dtype=f64)
  %clamp: f64[2, 3] = aten.clamp(%_to_copy, -inf, 0.5)
  return [%clamp]
}
"""


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return Small().eval(), torch.randn(2, 4)


def test_printer_golden(small):
    m, x = small
    assert trace(m, (x,)).text() == GOLDEN


def test_printer_is_deterministic(small):
    m, x = small
    assert trace(m, (x,)).text() == trace(m, (x,)).text()


def test_json_round_trip_runs_identically(small):
    m, x = small
    g = trace(m, (x,))
    data = json.loads(json.dumps(graph_to_json(g.gm)))
    assert any({"float": "-inf"} in n.get("args", []) for n in data["nodes"])
    gm = graph_from_json(data)
    (out,) = gm(*g.placeholder_args([x]))
    torch.testing.assert_close(out, m(x), rtol=0, atol=0)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("name, why", [
    ("builtins.eval", "not an ATen/prims/kiln op"),
    ("os.system.default", "not an ATen/prims/kiln op"),
    ("aten.no_such_op.default", "does not exist in this torch"),
])
def test_unknown_targets_are_refused(name, why):
    with pytest.raises(ArtifactError, match=why):
        resolve_target(name)


def test_bad_argument_kind_is_refused(small):
    m, x = small
    data = graph_to_json(trace(m, (x,)).gm)
    data["nodes"][2]["args"][1] = {"pickle": "gASV"}
    with pytest.raises(ArtifactError, match="unknown argument kind 'pickle'"):
        graph_from_json(data)
