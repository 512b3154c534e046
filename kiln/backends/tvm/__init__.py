"""kiln's TVM lowering, target-neutral: FX partition -> TVM Relax -> a VM library, for any ``TvmTarget``.

The core (conversion and its op table, fusion, the pipeline skeleton, the
lowering driver) lives here; a target provides its own parts through
``TvmTarget`` (``target.py``): the CPU's are in ``kiln/backends/cpu/``.
See README.md in this folder for the flow and the measured numbers.
"""
from .convert import convertible
from .dispatch import DispatchRule, LibraryDispatch
from .lowering import TvmLowered, lower_partition
from .target import PlanStage, TvmTarget

__all__ = ["DispatchRule", "LibraryDispatch", "PlanStage", "TvmLowered", "TvmTarget", "convertible",
           "lower_partition"]
