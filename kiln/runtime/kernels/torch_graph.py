"""The ``torch-graph`` kernel format: a JSON graph of ATen ops run with PyTorch's kernels.

The graph is rebuilt as an FX GraphModule once at load time, so calls run
generated Python, not an interpreter loop; the weights are bound then too.
A graph with collectives (``kiln.ir.collectives``) runs them over the process
groups of this process, by name: its first call checks that
``torch.distributed`` has a group of each name and says which is missing.
"""
from __future__ import annotations

import torch

from ...errors import ProcessGroupError
from ...ir.collectives import process_group_names
from ...ir.serialize import graph_from_json


def load(entry: dict, files, weights: dict[str, torch.Tensor]):
    gm = graph_from_json(entry["spec"]["graph"])
    bound = [weights[name] for name in entry["weights"]]
    groups = process_group_names(gm)

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return gm(*inputs, *bound)

    if not groups:
        return run
    checked = False

    def run_collectives(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal checked
        if not checked:
            _check_groups(entry["name"], groups)
            checked = True
        return run(*inputs)

    return run_collectives


def _check_groups(task: str, groups: list[str]) -> None:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    if not dist.is_available() or not dist.is_initialized():
        raise ProcessGroupError(
            f"task {task} calls collectives over process group(s) {', '.join(map(repr, groups))}, but "
            "torch.distributed is not initialized in this process: call torch.distributed.init_process_group "
            "(gloo on CPU, nccl on GPU) on every rank before running it")
    for name in groups:
        try:
            _resolve_process_group(name)
        except RuntimeError:
            raise ProcessGroupError(
                f"task {task} calls collectives over process group {name!r}, which this process does not have "
                "(the group names are those of the compiling process: create the same groups, in the same "
                "order, before running it)") from None
