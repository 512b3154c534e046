"""Typed metadata that kiln keeps on every node of its IR.

A node's metadata lives at ``node.meta["kiln"]`` as a :class:`NodeMeta`. The
tensor types are derived from the ``val`` that torch.export and shape
propagation leave on each node; the other fields start empty and are filled by
the passes that own them (placement by the partitioner, role/layer by region
analysis, quant/chunk/stage by the paper passes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

META_KEY = "kiln"

# Short names used by the printer and the artifact format; every dtype kiln can
# carry has one, so an unknown dtype is an error rather than a silent str().
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"kiln does not support dtype {dtype}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; known: {', '.join(DTYPES_BY_NAME)}") from None


Dim = int | str  # a static size, or the name of a symbolic (dynamic) dimension


@dataclass(frozen=True)
class TensorType:
    """Shape and dtype of one tensor value; symbolic dims are kept as their names."""

    shape: tuple[Dim, ...]
    dtype: str

    @classmethod
    def of(cls, value: torch.Tensor) -> TensorType:
        return cls(tuple(_dim(d) for d in value.shape), dtype_name(value.dtype))

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict) -> TensorType:
        return cls(tuple(data["shape"]), data["dtype"])


def _dim(d) -> Dim:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return int(expr) if expr.is_number else str(expr)
    return int(d)


def types_of(value) -> tuple[TensorType, ...] | None:
    """The tensor types of a node's ``val``: one per tensor output, None for non-tensors."""
    if isinstance(value, torch.Tensor):
        return (TensorType.of(value),)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(TensorType.of(v) for v in value)
    return None


@dataclass
class QuantSpec:
    """How a node's weight is quantized; filled by the quantization passes."""

    scheme: str
    bits: tuple[int, ...]
    group_size: int | None = None


@dataclass
class NodeMeta:
    """Everything kiln knows about a node beyond its op and arguments."""

    types: tuple[TensorType, ...] | None = None
    placement: str | None = None  # backend name, set by the partitioner
    layer: int | None = None  # transformer layer index, set by region analysis
    role: str | None = None  # "attention" | "ffn" | "other" | "comm"
    quant: QuantSpec | None = None
    chunk: int | None = None
    stage: int | None = None
    created_by: str = "trace"  # the pass that created this node
    rewritten_by: list[str] = field(default_factory=list)  # passes that changed its op or inputs since

    def annotations(self) -> dict[str, object]:
        """The set fields other than types and provenance, for printing."""
        out: dict[str, object] = {}
        for key in ("placement", "layer", "role", "quant", "chunk", "stage"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out
