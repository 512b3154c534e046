"""Runtime kernel formats: how each backend's lowered partition is loaded and run.

A loader takes the partition's manifest entry, the artifact's files and the
weights it reads, and returns a callable from input tensors to a sequence
of output tensors. Loaders are imported only when an artifact needs them.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ...errors import ArtifactError


class Files(Protocol):
    def bytes(self, name: str) -> bytes: ...

    def path(self, name: str) -> str: ...


Kernel = Callable[..., Sequence[torch.Tensor]]

# format name -> "module:function" of its loader, relative to this package
_LOADERS = {
    "torch-graph": "torch_graph:load",
    "tvm-vm": "tvm_vm:load",
    "npu-emulated": "npu_emulated:load",
}
FORMATS = tuple(_LOADERS)


def load_kernel(entry: dict, files: Files, weights: dict[str, torch.Tensor]) -> Kernel:
    fmt = entry.get("format")
    if fmt not in _LOADERS:
        raise ArtifactError(f"partition {entry.get('name')!r} has kernel format {fmt!r}, which this runtime "
                            f"cannot load (known: {', '.join(sorted(_LOADERS))})")
    module, fn = _LOADERS[fmt].split(":")
    loader = getattr(importlib.import_module(f"{__name__}.{module}"), fn)
    return loader(entry, files, weights)
