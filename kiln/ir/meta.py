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


QUANT_LAYOUTS = ("per-channel", "grouped", "nested-msb", "bit-planes")


@dataclass(frozen=True)
class QuantSpec:
    """How a node's weight is quantized, set by a quantization pass and read by the backend that lowers it.

    ``bits`` lists every bit-width the stored weight serves (one for a plain
    quantized weight; several for a nested one, widest first). ``scale`` and
    ``zero_point`` name the graph weights (``Graph.weights``) holding the
    scales and zero points (None: symmetric, no zero point); ``axis`` is the
    weight axis the scales run along (0: one per output channel of a linear)
    and ``group_size`` the number of elements of the other axis sharing one
    scale (None: the whole axis). ``layout`` says how the codes are stored:

    - ``per-channel`` / ``grouped``: one integer code per element;
    - ``nested-msb``: ``bits[0]``-bit codes whose top ``b`` bits are the
      ``b``-bit code, each view with its own scales (``scale`` then names the
      first view's; the others follow the pass's naming, documented there);
    - ``bit-planes``: one plane per bit, most significant first.
    """

    scheme: str  # e.g. "symmetric", "asymmetric", "nested"
    bits: tuple[int, ...]
    scale: str | None = None
    zero_point: str | None = None
    axis: int | None = 0
    group_size: int | None = None
    layout: str = "per-channel"

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(self.bits))
        if not self.bits or any(not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 16 for b in self.bits):
            raise ValueError(f"QuantSpec.bits must be bit-widths 1..16, not {self.bits!r}")
        if self.layout not in QUANT_LAYOUTS:
            raise ValueError(f"QuantSpec.layout {self.layout!r} is not one of {', '.join(QUANT_LAYOUTS)}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"QuantSpec.group_size must be a positive integer or None, not {self.group_size!r}")

    def __str__(self) -> str:
        parts = [self.scheme, "/".join(map(str, self.bits)) + "b", self.layout]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.scale is not None:
            parts.append(f"scale={self.scale}")
        if self.zero_point is not None:
            parts.append(f"zp={self.zero_point}")
        return " ".join(parts)

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "bits": list(self.bits), "scale": self.scale, "zero_point": self.zero_point,
                "axis": self.axis, "group_size": self.group_size, "layout": self.layout}

    @classmethod
    def from_json(cls, data: dict) -> QuantSpec:
        return cls(**data)


ROLES = ("attention", "ffn", "other", "comm")


@dataclass
class NodeMeta:
    """Everything kiln knows about a node beyond its op and arguments."""

    types: tuple[TensorType, ...] | None = None
    placement: str | None = None  # backend name, set by placement
    queue: str | None = None  # the queue its task runs on ("cpu0", "npu0"); None: the backend's default queue
    program: str | None = None  # the program it belongs to, for passes that split a graph into several
    layer: int | None = None  # transformer layer index, set by region analysis
    role: str | None = None  # one of ROLES: "attention" | "ffn" | "other" | "comm" (a collective)
    quant: QuantSpec | None = None
    chunk: int | None = None
    stage: int | None = None
    created_by: str = "trace"  # the pass that created this node
    rewritten_by: list[str] = field(default_factory=list)  # passes that changed its op or inputs since

    def annotations(self) -> dict[str, object]:
        """The set fields other than types and provenance, for printing."""
        out: dict[str, object] = {}
        for key in ("placement", "queue", "program", "layer", "role", "quant", "chunk", "stage"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out
