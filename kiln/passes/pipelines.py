"""Named pipelines: each target's default list of passes, built from named stages.

A stage is a list of pass names that belong together; a pipeline joins stages.
The four paper families add their stages here as they arrive.
"""
from __future__ import annotations

from ..errors import UnknownNameError

STAGES: dict[str, list[str]] = {
    "cleanup": ["remove_trace_asserts", "eliminate_dead_code", "fold_constants"],
    "optimize": ["prune_rows"],
    "analysis": ["annotate_regions"],
    # each does nothing unless its option is set: CompileOptions.quantization, CompileOptions.int8
    "quantize": ["quantize_nested", "extract_outliers"],
    # does nothing unless CompileOptions.precision is "bf16": GEMMs and attention in bf16, the rest fp32
    "precision": ["lower_precision"],
    # linears on one input as one wider GEMM (after lower_precision, whose bf16 linears read one cast)
    "merge": ["merge_linears"],
    "placement": ["place"],  # every pass before it may set placements it needs kept
    "schedule": ["schedule_blocks"],  # reads placements: each device's ready work in one run
}

PIPELINES: dict[str, list[str]] = {
    "cpu": ["cleanup", "optimize", "analysis", "quantize", "precision", "merge", "placement"],
    "torch": ["cleanup", "optimize", "analysis", "quantize", "precision", "merge", "placement"],
    # the emulated NPU (kiln/backends/npu): ExtractOutliers in "quantize", ScheduleBlocks after placement
    "npu": ["cleanup", "optimize", "analysis", "quantize", "precision", "merge", "placement", "schedule"],
    "none": [],
}


def get_pipeline(name: str) -> list[str]:
    """The pass names of a pipeline, in order."""
    try:
        stages = PIPELINES[name]
    except KeyError:
        raise UnknownNameError("pipeline", name, PIPELINES) from None
    return [p for stage in stages for p in STAGES[stage]]
