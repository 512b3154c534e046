"""kiln's passes: one module per pass, the pass manager, its instruments and pipelines.

Importing this package registers every pass below by name.
"""
from . import (  # noqa: F401  (registers the passes)
    annotate_regions, chunk_prefill, eliminate_dead_code, extract_outliers, fold_constants, lower_precision,
    merge_linears, place, prune_rows, quantize_nested, remove_trace_asserts, schedule_blocks,
)
from .base import Pass, PassContext, PassResult, get_pass, register_pass, registered_passes
from .instruments import Drift, Skip, Snapshot, StopAfter, Verify, verification_default
from .manager import Instrument, PassManager, PassRecord, StopPipeline
from .pipelines import PIPELINES, STAGES, get_pipeline

__all__ = [
    "Pass", "PassContext", "PassResult", "get_pass", "register_pass", "registered_passes",
    "Drift", "Skip", "Snapshot", "StopAfter", "Verify", "verification_default",
    "Instrument", "PassManager", "PassRecord", "StopPipeline", "PIPELINES", "STAGES", "get_pipeline",
]
