"""The ``torch`` backend: PyTorch's own ATen kernels, run from the artifact's JSON graph.

The reference backend (target ``torch``) and the ``cpu`` target's fallback for
what TVM cannot lower (dynamic shapes, ops without a converter). Op table:
every ATen or prims op (and the Python operators of symbolic-size arithmetic),
since the runtime calls them through ``torch.ops``. Ops of other namespaces (a
user's ``torch.library`` custom ops) cannot be run from an artifact and are
refused at placement time.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.serialize import graph_to_json, is_python_target, target_name
from .base import Backend, LoweredPartition, Partition, register_backend

_NAMESPACES = ("aten", "prims")


@register_backend
class TorchBackend(Backend):
    name = "torch"

    def supports(self, node: fx.Node) -> bool:
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return t.namespace in _NAMESPACES
        return is_python_target(t)

    def lower(self, partition: Partition) -> LoweredPartition:
        ops = sorted({target_name(n.target) for n in partition.gm.graph.nodes if n.op == "call_function"})
        return LoweredPartition(
            format="torch-graph",
            spec={"graph": graph_to_json(partition.gm)},
            report={"kernels": "pytorch", "ops": ops},
        )
