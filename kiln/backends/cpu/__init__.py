"""The ``cpu`` backend: each partition compiled by TVM Relax for this host's CPU.

The shared TVM lowering (``kiln/backends/tvm/``) with this package's CPU
parts, gathered in ``target.CpuTarget``: library dispatch of GEMM-class ops
and attention to PyTorch kernels (``dispatch.py``), each GEMM's kernel
measured per shape (``gemm.py``), kiln's CPU schedule rules (``schedule.py``),
the LLVM host target (``target.py``) and optional MetaSchedule tuning
(``tuning.py``); everything not dispatched becomes scheduled, fused TIR
kernels. The flow, its named stages and measured numbers are in
``kiln/backends/tvm/README.md``.

Op table: the ops ``kiln.backends.tvm.convertible`` accepts with this
dispatch, with static shapes (TVM compiles one library per shape: compile
per shape bucket). The ``cpu`` target places what this backend cannot take
on ``torch``, and says so in the log.

Its options are a ``CpuOptions`` (``options.py``), given as
``CompileOptions(backend_options={"cpu": CpuOptions(...)})``: the GEMM kernel
mode, and MetaSchedule tuning of the TIR kernels (``tune_trials`` /
``tuning_database``, ``tuning.py``); each partition's tuning database goes
into the artifact as ``<partition>.tuning.{workloads,records}.json``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..base import Backend, LoweredPartition, Partition, register_backend
from ..tvm import convertible, lower_partition
from . import attention, lowbit
from .dispatch import DISPATCH
from .options import CpuOptions, GemmKernels
from .target import CpuTarget
from .tuning import Tuning, database_file_names, read_tuning_databases


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
    options_type = CpuOptions
    options: CpuOptions

    def supports(self, node: fx.Node) -> bool:
        if node.target is lowbit.NESTED_LINEAR:  # the generated low-bit kernels (lowbit.py)
            return _static(node) and _non_empty(node) and lowbit.supports_nested_linear(node)
        if attention.computes(node):  # decode and prefill attention's kernels (attention.py)
            return _non_empty(node) and attention.eager_strides(*node.args[:3]) is not None
        return _static(node) and _non_empty(node) and convertible(node, DISPATCH)

    _tuning: Tuning | None = None

    def tuning(self) -> Tuning | None:
        """The tuning this compilation asks for (None: none); a database is read once, for every partition."""
        options = self.options
        if not options.tune_trials and options.tuning_database is None:
            return None
        if self._tuning is None:
            databases = read_tuning_databases(options.tuning_database) if options.tuning_database else ()
            self._tuning = Tuning(options.tune_trials, databases)
        return self._tuning

    def lower(self, partition: Partition) -> LoweredPartition:
        target = CpuTarget(gemm_kernels=self.options.gemm_kernels.value, tuning=self.tuning(),
                           pack_weights=self.options.pack_weights)
        lowered = lower_partition(partition.gm, len(partition.inputs), partition.weights, target)
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


__all__ = ["CpuBackend", "CpuOptions", "CpuTarget", "GemmKernels"]
