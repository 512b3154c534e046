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
    manifest["partitions"][0]["spec"][field] = value  # as if written on another machine
    manifest["manifest_sha256"] = _sha256(_canonical(manifest))
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(message)):
        kiln.load(path)
