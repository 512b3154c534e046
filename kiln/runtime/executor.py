"""The executor: runs an artifact's partitions in schedule order.

Compiling and loading meet here: ``kiln.compile`` builds an
:class:`~kiln.runtime.artifact.Artifact` in memory and ``kiln.load`` reads one
from disk; both are run by :class:`CompiledModel`, so what a test checks after
compiling is what runs after loading.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..ir.signature import Signature
from .artifact import Artifact, write_artifact
from .kernels import load_kernel


class _ArtifactFiles:
    """Files of an artifact, by name: the bytes ``read_artifact`` verified, never the path they came from.

    A loader that needs a path (TVM's ``dlopen``) gets a copy of the verified
    bytes in a private directory this process creates (``mkdtemp``: mode 0700,
    a fresh name), so replacing a file in the artifact directory after it was
    hashed cannot put foreign code in its place. The copy lives as long as
    this object (the CompiledModel).
    """

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self._tmp: tempfile.TemporaryDirectory | None = None

    def bytes(self, name: str) -> bytes:
        try:
            return self.artifact.files[name]
        except KeyError:
            raise ArtifactError(f"artifact has no file {name!r}") from None

    def path(self, name: str) -> str:
        data = self.bytes(name)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kiln-")
        p = Path(self._tmp.name) / name
        if not p.exists():
            p.write_bytes(data)
        return str(p)


class CompiledModel:
    """A compiled model: call it like the original module."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        m = artifact.manifest
        self.signature = Signature.from_json(m["signature"])
        self._files = _ArtifactFiles(artifact)
        self._steps = []
        for entry in m["partitions"]:  # read_artifact has checked every name (runtime/manifest.py)
            kernel = load_kernel(entry, self._files, {w: artifact.weights[w] for w in entry["weights"]})
            self._steps.append((entry["inputs"], entry["outputs"], kernel))
        self._outputs = m["outputs"]

    @property
    def target(self) -> str:
        return self.artifact.manifest["target"]

    @property
    def manifest(self) -> dict:
        return self.artifact.manifest

    @property
    def example_inputs(self) -> list[torch.Tensor] | None:
        return self.artifact.example_inputs

    def run(self, flat_inputs: list[torch.Tensor]) -> list:
        """Run on flat, already checked inputs; returns flat outputs."""
        env = dict(zip((i.name for i in self.signature.inputs), flat_inputs))
        with torch.no_grad():
            for inputs, outputs, kernel in self._steps:
                env.update(zip(outputs, kernel(*[env[n] for n in inputs])))
        weights = self.artifact.weights
        return [(env[o["value"]] if o["value"] in env else weights[o["value"]]) if "value" in o else o["literal"]
                for o in self._outputs]

    def __call__(self, *args, **kwargs):
        return self.signature.unflatten(self.run(self.signature.flatten(args, kwargs)))

    def save(self, path, signing_key=None) -> Path:
        """Write the artifact to the directory ``path`` (atomically), signed if given an ed25519 ``signing_key``.

        ``signing_key``: an ``Ed25519PrivateKey``, or its raw or PEM bytes
        (``kiln.runtime.signing``); ``kiln.load(path, trusted_keys=[...])`` then
        checks the signature before it loads anything.
        """
        return write_artifact(self.artifact, path, signing_key)

    def __repr__(self) -> str:
        m = self.artifact.manifest
        return (f"<kiln.CompiledModel {m.get('model')} target={m['target']} "
                f"partitions={len(m['partitions'])} weights={len(self.artifact.weights)}>")
