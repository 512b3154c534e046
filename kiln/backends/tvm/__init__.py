"""The CPU backend's lowering: FX partition -> TVM Relax -> LLVM library, GEMMs and attention on PyTorch kernels.

See README.md in this folder for the flow and the measured numbers.
"""
from .convert import convertible
from .lowering import TvmLowered, lower_partition

__all__ = ["TvmLowered", "convertible", "lower_partition"]
