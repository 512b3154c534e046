"""Backends: what runs where (placement, partitioning) and lowering partitions for the runtime."""
from . import cpu, npu, pytorch  # noqa: F401  (registers the backends)
from .base import TARGETS, Backend, LoweredPartition, Partition, get_backend, register_backend, target_backends
from .partition import assign_placement, place_and_lower, split_by_placement

__all__ = ["TARGETS", "Backend", "LoweredPartition", "Partition", "get_backend", "register_backend",
           "target_backends", "assign_placement", "place_and_lower", "split_by_placement"]
