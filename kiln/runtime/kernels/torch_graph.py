"""The ``torch-graph`` kernel format: a JSON graph of ATen ops run with PyTorch's kernels.

The graph is rebuilt as an FX GraphModule once at load time, so calls run
generated Python, not an interpreter loop; the weights are bound then too.
"""
from __future__ import annotations

import torch

from ...ir.serialize import graph_from_json


def load(entry: dict, files, weights: dict[str, torch.Tensor]):
    gm = graph_from_json(entry["spec"]["graph"])
    bound = [weights[name] for name in entry["weights"]]

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return gm(*inputs, *bound)

    return run
