"""The ``cpu`` backend's own compile options: ``CompileOptions(backend_options={"cpu": CpuOptions(...)})``.

Only the ``cpu`` backend reads these; the backend gets this object as its
``options`` (``Backend.options_type`` names the class, ``base.check_backend_options``
checks what ``CompileOptions.backend_options`` holds).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import KilnError, TuningError, UnknownNameError


class GemmKernels(str, enum.Enum):
    """How the ``cpu`` backend picks each GEMM's kernel (``gemm.py``)."""

    MEASURE = "measure"  # time MKL, MKL in column blocks, MKL on packed weights and oneDNN per shape; run the fastest
    MKL = "mkl"  # eager's kernel only (column blocks where faster): GEMM results bitwise eager's
    ONEDNN = "onednn"  # oneDNN wherever it applies, unmeasured (comparisons, tests)


@dataclass
class CpuOptions:
    """What tunes the ``cpu`` backend's lowering. ``gemm_kernels`` also accepts its string values."""

    # Offline tuning of the TIR kernels with MetaSchedule: the number of candidate schedules
    # measured in total (0: none). Minutes per 100 trials; never needed to compile or run.
    # See kiln/backends/tvm/README.md, "Tuning".
    tune_trials: int = 0
    # A kiln artifact directory (its stored tuning databases, verified) or a MetaSchedule
    # JSON database directory: its best records are applied, and the kernels it covers
    # are not tuned again. Works with tune_trials=0 (apply only).
    tuning_database: str | None = None
    gemm_kernels: GemmKernels = GemmKernels.MEASURE
    # f32 linears on constant weights may run on a copy packed once at load for MKL's sgemm (``mkl_packed``) or
    # oneDNN's inner product (``onednn_packed``), where measured faster: it holds a second copy of each such
    # weight in memory (about its size) for each row count a program runs it at. False: never (the loaded
    # weights take what they take in eager).
    pack_weights: bool = True

    def __post_init__(self):
        if not isinstance(self.gemm_kernels, GemmKernels):
            try:
                self.gemm_kernels = GemmKernels(self.gemm_kernels)
            except ValueError:
                raise UnknownNameError("value for CpuOptions.gemm_kernels", self.gemm_kernels,
                                       [m.value for m in GemmKernels]) from None
        if not isinstance(self.pack_weights, bool):
            raise KilnError(f"CpuOptions.pack_weights must be True or False, not {self.pack_weights!r}")
        if isinstance(self.tune_trials, bool) or not isinstance(self.tune_trials, int) or self.tune_trials < 0:
            raise TuningError(f"CpuOptions.tune_trials must be a whole number of trials >= 0 (0: no tuning), "
                              f"not {self.tune_trials!r}")
        if self.tuning_database is not None:
            if not isinstance(self.tuning_database, (str, os.PathLike)):
                raise TuningError("CpuOptions.tuning_database must be a path (str or os.PathLike), "
                                  f"not {type(self.tuning_database).__name__}")
            self.tuning_database = os.fspath(self.tuning_database)
            if not Path(self.tuning_database).is_dir():
                raise TuningError(f"CpuOptions.tuning_database: {self.tuning_database!r} does not exist or is "
                                  "not a directory (give a kiln artifact or a MetaSchedule database directory)")
