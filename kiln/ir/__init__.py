"""kiln's graph IR: tracing, the Graph type, typed metadata, printing and graph formats."""
from .graph import Graph
from .meta import NodeMeta, QuantSpec, TensorType
from .signature import InputSpec, Signature

__all__ = ["Graph", "NodeMeta", "QuantSpec", "TensorType", "InputSpec", "Signature", "trace"]


def trace(*args, **kwargs) -> Graph:
    from .tracing import trace as _trace

    return _trace(*args, **kwargs)
