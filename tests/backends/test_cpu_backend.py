"""The cpu (TVM) backend through kiln.compile: behaviour a user sees beyond matching eager."""
import re

import pytest
import torch
from torch import nn

import kiln


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(self.emb(ids)).softmax(-1)


def test_out_of_range_token_ids_raise_like_eager_instead_of_reading_out_of_bounds():
    torch.manual_seed(0)
    m, ids = Embed().eval(), torch.randint(0, 50, (2, 6))
    cm = kiln.compile(m, (ids,))
    report = cm.manifest["partitions"][0]["report"]
    assert report["dispatched"]["kiln.embedding"] == 1
    torch.testing.assert_close(cm(ids), m(ids))
    bad = ids.clone()
    bad[1, 2] = 50
    with pytest.raises(IndexError, match="index out of range"):
        m(bad)
    with pytest.raises(IndexError, match="index out of range"):
        cm(bad)


@pytest.mark.parametrize("field, value, message", [
    ("mcpu", "sapphirerapids", "built for CPU 'sapphirerapids' (this machine is"),
    ("tvm_version", "0.19.0", "built for TVM '0.19.0' (this runtime has TVM"),
])
def test_a_library_for_another_cpu_or_tvm_is_refused_on_load(tmp_path, field, value, message):
    import json

    from kiln.errors import ArtifactError
    from kiln.runtime.artifact import _canonical, _sha256

    torch.manual_seed(0)
    m, ids = Embed().eval(), torch.randint(0, 50, (2, 6))
    path = kiln.compile(m, (ids,)).save(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["programs"]["main"]["tasks"][0]["spec"][field] = value  # as if written on another machine
    manifest["manifest_sha256"] = _sha256(_canonical(manifest))
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(message)):
        kiln.load(path)


class Gathers(nn.Module):
    def forward(self, x, rows, cols):
        picked = torch.index_select(x, 0, rows)
        return torch.gather(picked, 1, cols).sum(-1)


def test_gathers_with_run_time_indices_are_bounds_checked_like_eager():
    x, rows, cols = torch.randn(6, 5), torch.tensor([0, 5, 2]), torch.tensor([[0, 4], [1, 1], [3, 2]])
    cm = kiln.compile(Gathers(), (x, rows, cols))
    dispatched = cm.manifest["partitions"][0]["report"]["dispatched"]
    assert dispatched["kiln.index_select"] == 1 and dispatched["kiln.gather"] == 1
    torch.testing.assert_close(cm(x, rows, cols), Gathers()(x, rows, cols))
    with pytest.raises(IndexError, match="out of range"):
        cm(x, torch.tensor([0, 6, 2]), cols)
    with pytest.raises(RuntimeError, match="out of bounds"):
        Gathers()(x, rows, torch.tensor([[0, 5], [1, 1], [3, 2]]))
    with pytest.raises(RuntimeError, match="out of bounds"):
        cm(x, rows, torch.tensor([[0, 5], [1, 1], [3, 2]]))
