"""The ``cpu`` backend: each partition compiled by TVM Relax for this host's CPU.

GEMM-class ops and attention run as PyTorch kernels called from the compiled
library (library dispatch); everything else becomes scheduled, fused TIR
kernels. The flow, its named stages and measured numbers are in
``kiln/backends/tvm/README.md``.

Op table: the ops ``kiln.backends.tvm.convertible`` accepts, with static
shapes (TVM compiles one library per shape: compile per shape bucket). The
``cpu`` target places what this backend cannot take on ``torch``, and says so
in the log.

With ``CompileOptions.tune_trials`` / ``tuning_database``, MetaSchedule tunes
the TIR kernels (``kiln/backends/tvm/tuning.py``); each partition's database
goes into the artifact as ``<partition>.tuning.{workloads,records}.json``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .base import Backend, LoweredPartition, Partition, register_backend
from .tvm import Tuning, convertible, database_file_names, lower_partition, read_tuning_databases


def _static(node: fx.Node) -> bool:
    val = node.meta.get("val")
    values = val if isinstance(val, (tuple, list)) else (val,)
    return all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) for v in values)


def _non_empty(node: fx.Node) -> bool:
    """No zero-element tensor in or out: TVM's VM gives empty buffers other strides than PyTorch
    (a Linear of a [11, 3, 0, 8] input failed at call time), and they hold no work to compile."""
    vals = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
    flat = [v for val in vals for v in (val if isinstance(val, (tuple, list)) else (val,))]
    return all(not isinstance(v, torch.Tensor) or v.numel() > 0 for v in flat)


@register_backend
class CpuBackend(Backend):
    name = "cpu"

    def supports(self, node: fx.Node) -> bool:
        return _static(node) and _non_empty(node) and convertible(node)

    _tuning: Tuning | None = None

    def tuning(self) -> Tuning | None:
        """The tuning this compilation asks for (None: none); a database is read once, for every partition."""
        options = self.options
        if options is None or (not options.tune_trials and options.tuning_database is None):
            return None
        if self._tuning is None:
            databases = read_tuning_databases(options.tuning_database) if options.tuning_database else ()
            self._tuning = Tuning(options.tune_trials, databases)
        return self._tuning

    def lower(self, partition: Partition) -> LoweredPartition:
        gemm_kernels = self.options.gemm_kernels.value if self.options is not None else "measure"
        lowered = lower_partition(partition.gm, len(partition.inputs), partition.weights, tuning=self.tuning(),
                                  gemm_kernels=gemm_kernels)
        spec = dict(lowered.spec)
        report = spec.pop("report")
        files = {f"{partition.name}.so": lowered.library}
        compiler_files = []
        if lowered.tuning is not None:
            # Stored (and hashed) with the artifact so a later compile can reuse it
            # (tuning_database=<this artifact>); the tuned schedules are already in the .so.
            compiler_files = list(database_file_names(partition.name))
            files.update(zip(compiler_files, (lowered.tuning.database.workloads, lowered.tuning.database.records)))
            report["tuning"]["database_files"] = compiler_files
        return LoweredPartition(
            format=spec["format"],
            spec=spec,
            files=files,
            compiler_files=compiler_files,
            report=report,
            details={"tir": lowered.kernels},
        )
