"""Nested low-bit weights: one stored form from which the 8-, 4- and 2-bit views are read without copies.

The form (DyQ-VLA's "weights held once in nested bit-widths", as Matryoshka
quantization slices int2 from int8's most significant bits):

- Each group of ``G`` consecutive inputs of a row (``G`` a multiple of 128)
  has an 8-bit affine grid over ``[min(w, 0), max(w, 0)]``: codes
  ``q in [0, 255]`` and a zero point ``z`` (in 8-bit code units; 0 is always
  on the grid, so ``0 <= z <= 255``).
- The ``b``-bit view reads the top ``b`` bits of ``q``: ``c_b = q >> (8 - b)``,
  dequantized as ``d_b * (c_b - z_b)`` with ``z_b = (z - m_b) / 2**(8 - b)``
  and ``m_b = (2**(8 - b) - 1) / 2`` (the centre of the bits dropped). Each
  view has its own step ``d_b`` per group, fitted by least squares to the
  float weight given its codes; the zero point is shared.
- The codes are stored as three bit planes, so a view reads only the bytes
  it needs: ``hi`` (the top 2 bits; the 2-bit view), ``mid`` (the next 2;
  the 4-bit view reads ``hi`` and ``mid``) and ``lo`` (the low 4; only the
  8-bit view). Within each block of 128 inputs ``k = 128 g + t``, the byte
  ``hi[n, 32 g + j]`` holds ``q[n, 128 g + 32 i + j] >> 6`` at bits
  ``2i, 2i + 1`` (``i = 0..3``), ``mid`` the same for ``(q >> 4) & 3``, and
  ``lo[n, 64 g + j]`` holds ``q[n, 128 g + 64 i + j] & 15`` at bits
  ``4i..4i + 3`` (``i = 0, 1``): a shift of one vector of bytes gives
  consecutive inputs, with no shuffle.
- Steps and zero points are float16 ``[N, K / G]``.

Bytes at G = 128: 1 per weight for the codes plus 2 bytes per group for each
view's step and 2 for the zero point; serving {8, 4, 2} costs 136 bytes per
128 weights against 132 for the 8-bit codes, step and zero point alone
(1.03x). A form that holds only some views (``views=(4, 2)``) has no ``lo``
plane: 0.5 bytes per weight plus the groups' parameters.

Measured (``tests/ir/test_nested.py`` states the bounds it checks): on
N(0, 0.02) weights at G = 128 the relative RMS error is 0.006 (8-bit),
0.095 (4-bit) and 0.38 (2-bit); plain round-to-nearest 2-bit over the same
groups gives 0.50.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 128  # inputs per block of the plane layout; a group is a whole number of blocks
VIEWS = (8, 4, 2)  # the bit-widths a nested weight can serve, widest first
PLANES = {"hi": 2, "mid": 2, "lo": 4}  # bit plane -> bits per weight it holds
PLANES_OF = {2: ("hi",), 4: ("hi", "mid"), 8: ("hi", "mid", "lo")}  # what each view reads
_SHIFT = {"hi": 6, "mid": 4, "lo": 0}


def view_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits``-bit view's zero point (float32) from the shared 8-bit one: ``(z - m_b) / 2**(8 - b)``."""
    step = 1 << (8 - bits)
    return (zero.float() - (step - 1) / 2) / step


@dataclass
class NestedWeight:
    """A weight ``[N, K]`` in nested form: bit planes, a step per view and group, one zero point per group."""

    planes: dict[str, torch.Tensor]  # "hi" / "mid" / "lo" -> uint8 planes (only those the views read)
    scales: dict[int, torch.Tensor]  # bits -> float16 [N, K / G] step of that view
    zero: torch.Tensor  # float16 [N, K / G], in 8-bit code units
    group_size: int

    @property
    def views(self) -> tuple[int, ...]:
        return tuple(sorted(self.scales, reverse=True))

    @property
    def shape(self) -> tuple[int, int]:
        hi = self.planes["hi"]
        return hi.shape[0], hi.shape[1] * 4

    def keeping(self, views: tuple[int, ...]) -> NestedWeight:
        """The same weight serving only ``views`` (a subset of its own): the planes and steps they read."""
        for bits in views:
            self._check_view(bits)
        planes = {p: self.planes[p] for p in PLANES_OF[max(views)]}
        return NestedWeight(planes, {b: self.scales[b] for b in views}, self.zero, self.group_size)

    def tensors_for(self, bits: int) -> list[torch.Tensor]:
        """What the ``bits``-bit view reads: its planes, its step, the zero point."""
        self._check_view(bits)
        return [self.planes[p] for p in PLANES_OF[bits]] + [self.scales[bits], self.zero]

    def nbytes(self, bits: int | None = None) -> int:
        """Bytes held (every view), or the bytes the ``bits``-bit view reads."""
        tensors = (list(self.planes.values()) + list(self.scales.values()) + [self.zero]) if bits is None \
            else self.tensors_for(bits)
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self, bits: int) -> torch.Tensor:
        """The ``bits``-bit view as a float32 ``[N, K]`` weight."""
        self._check_view(bits)
        return dequantize(self.planes, self.scales[bits], self.zero, bits, self.group_size)

    def _check_view(self, bits: int) -> None:
        if bits not in self.scales:
            raise ValueError(f"this nested weight holds the views {self.views}, not {bits} bits")


def held_bytes(n: int, k: int, group_size: int, views: tuple[int, ...]) -> int:
    """Bytes a ``[n, k]`` weight holds in nested form serving ``views``: its planes, a step per view, the zero."""
    planes = PLANES_OF[max(views)]
    groups = n * (k // group_size)
    return sum(n * k * PLANES[p] // 8 for p in planes) + 2 * groups * (len(views) + 1)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def pack_planes(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """8-bit codes ``[N, K]`` (uint8, K a multiple of 128) as the three bit planes of the layout above."""
    n, k = q.shape
    blocks = q.reshape(n, k // BLOCK, BLOCK).to(torch.int32)
    planes = {}
    for name, bits in PLANES.items():
        per_byte = 8 // bits
        part = (blocks >> _SHIFT[name]) & ((1 << bits) - 1)
        part = part.reshape(n, k // BLOCK, per_byte, BLOCK // per_byte)  # [.., i, j]: input i * (BLOCK/per) + j
        shifts = torch.arange(per_byte, dtype=torch.int32).mul(bits).view(1, 1, per_byte, 1)
        planes[name] = (part << shifts).sum(2).to(torch.uint8).reshape(n, k // per_byte)
    return planes


def unpack_codes(planes: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The ``bits``-bit view's codes ``c_b = q >> (8 - b)`` (int32 ``[N, K]``), read from its planes only."""
    code = None
    for name in PLANES_OF[bits]:
        width = PLANES[name]
        per_byte = 8 // width
        plane = planes[name]
        n, nbytes = plane.shape
        blocks = plane.reshape(n, -1, 1, BLOCK // per_byte).to(torch.int32)
        shifts = torch.arange(per_byte, dtype=torch.int32).mul(width).view(1, 1, per_byte, 1)
        part = ((blocks >> shifts) & ((1 << width) - 1)).reshape(n, nbytes * per_byte)
        code = part if code is None else (code << width) | part
    return code


def dequantize(planes: dict[str, torch.Tensor], scale: torch.Tensor, zero: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """``d_b * (c_b - z_b)`` as float32 ``[N, K]``, from the view's planes, step and the shared zero point."""
    codes = unpack_codes(planes, bits).float()
    n, k = codes.shape
    out = (_groups(codes, group_size) - view_zero(zero, bits).unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return out.reshape(n, k)


def encode(weight: torch.Tensor, group_size: int = BLOCK, views: tuple[int, ...] = VIEWS) -> NestedWeight:
    """Quantize a float weight ``[N, K]`` to the nested form serving ``views`` (a subset of 8, 4, 2)."""
    if weight.dim() != 2:
        raise ValueError(f"a nested weight is 2-d [outputs, inputs], not {list(weight.shape)}")
    n, k = weight.shape
    if group_size % BLOCK or k % group_size:
        raise ValueError(f"the group size must be a multiple of {BLOCK} that divides the {k} inputs; "
                         f"got {group_size}")
    bad = sorted(set(views) - set(VIEWS))
    if bad or not views:
        raise ValueError(f"views must be some of {VIEWS}, not {tuple(views)}")
    if not torch.isfinite(weight).all():
        raise ValueError("the weight has NaN or infinite values; it cannot be quantized")
    w = _groups(weight.detach().float(), group_size)
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    step8 = (hi - lo) / 255
    zero = torch.where(step8 > 0, -lo / step8.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    zero = zero.clamp(0, 255).half()
    safe_step = torch.where(step8 > 0, step8, 1.0)
    q = torch.where(step8 > 0, (w / safe_step + zero.float()).round(), zero.float().round()).clamp(0, 255)
    q = q.to(torch.int32)
    planes = pack_planes(q.reshape(n, k).to(torch.uint8))
    if 8 not in views:
        del planes["lo"]
    if 4 not in views and 8 not in views:
        del planes["mid"]
    scales = {}
    for bits in sorted(views, reverse=True):
        u = (q >> (8 - bits)).float() - view_zero(zero, bits)
        denom = (u * u).sum(-1)
        scales[bits] = torch.where(denom > 0, (w * u).sum(-1) / denom.clamp_min(1e-30), 0.0).half()
    return NestedWeight(planes, scales, zero.squeeze(-1), group_size)


def view_error(weight: torch.Tensor, nested: NestedWeight, bits: int) -> dict[str, float]:
    """How far the ``bits``-bit view is from ``weight``: relative RMS error and largest absolute error."""
    w = weight.detach().float()
    diff = nested.dequantize(bits) - w
    norm = w.pow(2).mean().sqrt().item()
    return {"rel_rms": diff.pow(2).mean().sqrt().item() / norm if norm > 0 else 0.0,
            "max_abs": diff.abs().max().item()}
