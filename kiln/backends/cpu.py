"""The ``cpu`` backend: each partition compiled by TVM Relax for this host's CPU.

GEMM-class ops and attention run as PyTorch kernels called from the compiled
library (library dispatch); everything else becomes scheduled, fused TIR
kernels. The flow, its named stages and measured numbers are in
``kiln/backends/tvm/README.md``.

Op table: the ops ``kiln.backends.tvm.convertible`` accepts, with static
shapes (TVM compiles one library per shape: compile per shape bucket). The
``cpu`` target places what this backend cannot take on ``torch``, and says so
in the log.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .base import Backend, LoweredPartition, Partition, register_backend
from .tvm import convertible, lower_partition


def _static(node: fx.Node) -> bool:
    val = node.meta.get("val")
    values = val if isinstance(val, (tuple, list)) else (val,)
    return all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) for v in values)


@register_backend
class CpuBackend(Backend):
    name = "cpu"

    def supports(self, node: fx.Node) -> bool:
        return _static(node) and convertible(node)

    def lower(self, partition: Partition) -> LoweredPartition:
        lowered = lower_partition(partition.gm, len(partition.inputs), partition.weights)
        spec = dict(lowered.spec)
        report = spec.pop("report")
        return LoweredPartition(
            format=spec["format"],
            spec=spec,
            files={f"{partition.name}.so": lowered.library},
            report=report,
            details={"tir": lowered.kernels},
        )
