"""The CPU backend's lowering: FX partition -> TVM Relax -> LLVM library, GEMMs and attention on PyTorch kernels.

See README.md in this folder for the flow and the measured numbers.
"""
from . import gemm  # noqa: F401  (kiln.backends.tvm.gemm)
from .convert import convertible
from .lowering import TvmLowered, lower_partition
from .tuning import Tuning, TuningDatabase, TuningError, TuningResult, database_file_names, read_tuning_databases

__all__ = ["Tuning", "TuningDatabase", "TuningError", "TuningResult", "TvmLowered", "convertible",
           "database_file_names", "lower_partition", "read_tuning_databases"]
