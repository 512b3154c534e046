"""Shared artifacts for the runtime tests: a `cpu` (TVM) and a `torch` model compiled once, and ways to edit them."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import kiln
from kiln.runtime.artifact import _canonical, _sha256


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.b2 = self.b  # a tied module: its weights must be stored once

    def forward(self, x):
        return {"logits": self.b2(torch.tanh(self.a(x))), "hidden": self.a(x)}


@pytest.fixture(scope="session")
def compiled():
    """(model, input, CompiledModel) for target `cpu`: one tvm-vm partition and its library."""
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(3, 8)
    return m, x, kiln.compile(m, (x,))


@pytest.fixture(scope="session")
def torch_compiled():
    """(model, input, CompiledModel) for target `torch`: one torch-graph partition."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(3, 4)
    return m, x, kiln.compile(m, (x,), target="torch")


@pytest.fixture
def saved(compiled, tmp_path):
    return compiled[2].save(tmp_path / "art")


@pytest.fixture
def torch_saved(torch_compiled, tmp_path):
    return torch_compiled[2].save(tmp_path / "torch_art")


def _write_manifest(path: Path, manifest: dict, rehash: bool = True) -> None:
    if rehash:
        manifest["manifest_sha256"] = _sha256(_canonical(manifest))
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def rewrite_manifest():
    """``rewrite_manifest(path, edit, rehash=True)``: apply ``edit`` to the manifest, then re-hash it (or not)."""

    def rewrite(path: Path, edit, rehash: bool = True) -> dict:
        m = json.loads((path / "manifest.json").read_text())
        edit(m)
        _write_manifest(path, m, rehash)
        return m
    return rewrite


@pytest.fixture
def replace_file():
    """``replace_file(path, name, data)``: a forger's rewrite: new bytes, their size and sha256, manifest re-hashed."""

    def replace(path: Path, name: str, data: bytes) -> dict:
        (path / name).write_bytes(data)
        m = json.loads((path / "manifest.json").read_text())
        m["files"][name] = {"bytes": len(data), "sha256": _sha256(data)}
        _write_manifest(path, m)
        return m
    return replace


@pytest.fixture
def no_kernel_loads(monkeypatch):
    """Fails the test if any partition is loaded: refusal must come before anything runs."""
    from kiln.runtime import executor

    def refuse(*a, **k):
        raise AssertionError("a kernel was loaded from an artifact that should have been refused")

    monkeypatch.setattr(executor, "load_kernel", refuse)
