"""The ``torch`` backend: PyTorch's own ATen kernels, run from the artifact's JSON graph.

The reference backend (target ``torch``) and the ``cpu`` target's fallback for
what TVM cannot lower (dynamic shapes, ops without a converter). Op table:
every ATen or prims op, and kiln's own ops (``kiln.ir.ops``, e.g.
``kiln::moe_experts``), and the functional collectives (``kiln.ir.collectives``:
all-reduce, all-gather, reduce-scatter, all-to-all, broadcast and their
waits, run over the process group of the loading process), that the
runtime's ``torch-graph`` loader admits
(``kiln.ir.serialize.op_refusal``: functional, no file I/O, no unchecked
memory access), and the Python operators of symbolic-size arithmetic. Other
ops (a user's ``torch.library`` custom ops, ``aten.from_file``, an in-place op
export left in the graph) cannot be run from an artifact and are refused at
placement time, so kiln never writes an artifact its runtime would refuse.
"""
from __future__ import annotations

import torch.fx as fx

from ..ir.serialize import graph_to_json, op_refusal, target_name
from .base import Backend, LoweredPartition, Partition, register_backend


@register_backend
class TorchBackend(Backend):
    name = "torch"

    def supports(self, node: fx.Node) -> bool:
        return op_refusal(node.target) is None

    def lower(self, partition: Partition) -> LoweredPartition:
        ops = sorted({target_name(n.target) for n in partition.gm.graph.nodes if n.op == "call_function"})
        return LoweredPartition(
            format="torch-graph",
            spec={"graph": graph_to_json(partition.gm)},
            report={"kernels": "pytorch", "ops": ops},
        )
