"""Generated low-bit CPU kernels over kiln's nested weight layout (``kiln.ir.nested``).

What they compute: ``y[M, N] = x[M, K] @ W_b^T (+ bias)`` for one view ``b`` in {2, 4, 8} of a
nested weight, with ``x`` float32 or bfloat16 (``y`` in ``x``'s dtype, fp32 accumulation) and
``W_b[n, k] = scale[n, k // G] * c_b[n, k] + offset[n, k // G]`` (``affine="offset"``), or the
nested form's own ``scale * (c_b - z_b)`` with the shared 8-bit zero point ``z`` and
``z_b = (z - m_b) / 2**(8 - b)``, ``m_b = (2**(8 - b) - 1) / 2`` (``affine="zero"``, what
``kiln::nested_linear`` passes).

The layout they read (per block of 128 inputs ``k = 128 g + t``; all uint8):
``hi[n, 32 g + j]`` holds ``q[n, 128 g + 32 i + j] >> 6`` at bits ``2i..2i+1``, ``mid`` the same for
``(q >> 4) & 3``, ``lo[n, 64 g + j]`` holds ``q[n, 128 g + 64 i + j] & 15`` at bits ``4i..4i+3``.
A view's function has only the planes it reads as parameters (2-bit: ``hi``; 4-bit: ``hi, mid``;
8-bit: all three), so it cannot read more; the codes of 32 (64) consecutive inputs come from one
32-byte load and a per-byte bit move, with no shuffle.

Kernels, each a TIR PrimFunc generated for one shape and compiled with LLVM for this host
(``build``; torch tensors pass zero-copy):

- ``decode_func`` (M up to ~8, decode): one fused pass over the planes; rows of ``W`` in tasks
  of 64 across the cores, the row two ahead software-prefetched. Schedules:

  - ``vnni512`` (the default with AVX-512 VNNI): x is written once per call, per 128-input
    block, as a fixed-point integer relative to the block's largest ``|x|`` in ``X_DIGITS`` = 2
    balanced base-256 digits (int8; ``x_digits`` 1 or 3 for 7 or 23 bits), with 16-lane vector
    code. A row's 32-byte plane slice is broadcast to
    both halves of a 512-bit register; one ``vgf2p8affineqb`` per plane moves two fields' bits
    into place (its matrix differs per half), so 64 codes (uint8) come from 1-3 instructions, and
    ``vpdpbusd`` multiplies them with the digits (64 u8 x s8 products, exact int32 sums). The
    digits' sums are combined in int32 (x256 between digits, top first) where a lane's sum fits
    (every view with two digits), else in fp32; each block's sum is scaled by
    ``scale[n, g] * x_step`` (precomputed per row) into two fp32 accumulators, summed at the row's
    end as a tree over the lanes. The offsets use
    the exact fp32 sums of x per group (``sum_k x_k W[n,k] = sum_g scale[n,g] sum_{k in g} x_k
    c[n,k] + offset[n,g] sum_{k in g} x_k``). Error: each x is rounded by at most half a step,
    ``2**-16`` of its block's ``max |x|`` with two digits (three: about ``2**-23``, fp32's own
    rounding of the scaled x), far below the view's own weight error
    (``tests/backends/test_lowbit.py`` states the bounds it checks). A
    NaN or inf in a row of x makes that row's outputs NaN.
  - ``vnni``: the same with 256-bit ``vpdpbusd`` on one field (32 codes) at a time.
  - ``fma``: each code converted to fp32 and multiplied in fp32 FMAs (no VNNI needed).
- ``dequantize_func`` (prefill): ``W_b`` as fp32 or bf16 ``[N, K]`` for a library GEMM.
- ``convert_nested_linear``: ``kiln::nested_linear`` in a Relax module as ``R.call_tir`` of
  ``decode_func`` (up to ``DECODE_MAX_ROWS`` rows) or of ``dequantize_func`` followed by the cpu
  dispatch's ``kiln.linear`` (PyTorch's GEMM), the PrimFuncs marked ``tirx.is_scheduled``.

Measured (``benchmarks/lowbit_kernels.py``; its docstring has the table; Xeon with AVX-512 VNNI and
AMX, 2 cores, TVM and PyTorch on both): 4096x4096, one row, weights from DRAM: fp32 ``F.linear``
2.47 ms; kiln 4-bit 0.41 ms (fp32 or bf16 x), 0.98x the time of reading its bytes with ``torch.sum``;
2-bit 0.30 / 0.26 ms, 8-bit 0.78; ``torch._weight_int4pack_mm_for_cpu`` 0.73, ``_weight_int8pack_mm``
0.84 (bf16 x only). Prefill (64 / 128 rows): dequantize to bf16 + ``F.linear`` 15 / 17 ms against bf16
``F.linear``'s 9 / 14 and fp32's 29 / 45; the fused kernel with 8-row x tiles is slower (26 / 52 ms), so
``convert_nested_linear`` dequantizes above ``DECODE_MAX_ROWS``.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import tvm
from tvm.script import tirx as T
from tvm.target import codegen

BLOCK = 128  # inputs per block of the plane layout
PLANES_OF = {2: ("hi",), 4: ("hi", "mid"), 8: ("hi", "mid", "lo")}
AFFINES = ("offset", "zero")
SCHEDULES = ("vnni512", "vnni", "fma")
_W = 32  # codes per vector: one 32-byte load of a plane row
DTYPES = ("float32", "bfloat16")  # of x (and y)
# Base-256 digits of the fixed-point x (``decode_func``'s ``x_digits``): x / (its block's max |x|) times
# 127 * 256**(P - 1), rounded, so each x is off by at most 2**-(8P - 1) of its block's max |x|. Two digits (the
# default: 2**-15) for both dtypes: for fp32 x that is a thousandth of the 4-bit view's own weight error and a
# fiftieth of the 8-bit view's, and against three digits (2**-23) it takes a third of the int8 products away.
X_DIGITS = 2
_VNNI = "llvm.x86.avx512.vpdpbusd.256"
_VNNI512 = "llvm.x86.avx512.vpdpbusd.512"


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """LLVM for this host's CPU (as the ``cpu`` backend's ``host_target``), ``num_cores`` threads."""
    cores = num_cores or len(os.sched_getaffinity(0))
    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": cores})


def has_vnni(target: tvm.target.Target | None = None) -> bool:
    return bool(codegen.llvm_cpu_has_features(["avx512vnni", "avx512vl"], target or host_target()))


def default_schedule(target: tvm.target.Target | None = None) -> str:
    """The fastest measured decode schedule this CPU can run (``vnni512`` needs AVX-512 VNNI)."""
    return "vnni512" if has_vnni(target) else "fma"


def _check(n: int, k: int, bits: int, group_size: int, dtype: str, affine: str, schedule: str) -> None:
    if bits not in PLANES_OF:
        raise ValueError(f"bits must be one of {sorted(PLANES_OF)}, not {bits}")
    if group_size % BLOCK or k % group_size:
        raise ValueError(f"the group size must be a multiple of {BLOCK} dividing K={k}; got {group_size}")
    if dtype not in DTYPES:
        raise ValueError(f"x must be float32 or bfloat16, not {dtype}")
    if affine not in AFFINES or schedule not in SCHEDULES:
        raise ValueError(f"affine must be one of {AFFINES} and schedule one of {SCHEDULES}")


def _lanes(extent: int, limit: int = 16) -> int:
    return next(v for v in (limit, 16, 8, 4, 2, 1) if v <= limit and extent % v == 0)


def _ramp(base, lanes):
    return T.ramp(base, 1, lanes) if lanes > 1 else base


def _bc(value, lanes):
    return T.broadcast(value, lanes) if lanes > 1 else value


def _combine(a, b, use_max: bool):
    return T.max(a, b) if use_max else a + b


@T.macro
def fold_lanes(buf, base, lanes, use_max):
    """``buf[base : base + lanes]`` (``lanes`` 16, 8 or 4) folded in halves into ``buf[base : base + 2]``: each
    step sums (``use_max``: takes the larger of) the lower and the upper half. A tree, not a serial chain."""
    if lanes >= 16:
        buf[_ramp(base, 8)] = _combine(buf[_ramp(base, 8)], buf[_ramp(base + 8, 8)], use_max)
    if lanes >= 8:
        buf[_ramp(base, 4)] = _combine(buf[_ramp(base, 4)], buf[_ramp(base + 4, 4)], use_max)
    buf[_ramp(base, 2)] = _combine(buf[_ramp(base, 2)], buf[_ramp(base + 2, 2)], use_max)


def _vt(dtype: str, lanes: int) -> str:
    return f"{dtype}x{lanes}" if lanes > 1 else dtype


def _codes(bits, hi, mid, lo, n, b, f):
    """The ``bits``-bit codes of inputs ``128 b + 32 f + (0..31)`` of row ``n``: a uint8x32 expression
    (``f`` is an unrolled loop variable: shifts by 0 and redundant masks fold away once it is a constant)."""
    def field(v, shift, mask):
        return T.bitwise_and(T.shift_right(v, T.broadcast(T.Cast("uint8", shift), _W)), T.broadcast(T.uint8(mask), _W))

    c = field(hi[n, _ramp(b * 32, _W)], 2 * f, 3)
    if bits >= 4:
        c = T.bitwise_or(T.shift_left(c, T.broadcast(T.uint8(2), _W)), field(mid[n, _ramp(b * 32, _W)], 2 * f, 3))
    if bits == 8:
        c = T.bitwise_or(T.shift_left(c, T.broadcast(T.uint8(4), _W)),
                         field(lo[n, _ramp(b * 64 + (f % 2) * _W, _W)], 4 * (f // 2), 15))
    return c


def _gf2_matrix(src: int, dst: int, width: int) -> int:
    """The ``vgf2p8affineqb`` matrix (a qword, as a signed int64) that moves bits ``src..src+width-1`` of each
    byte to bits ``dst..`` and clears the rest: result bit ``i`` is the parity of ``byte[7 - i] & x``."""
    a = sum((1 << (src + i)) << (8 * (7 - (dst + i))) for i in range(width))
    return a - (1 << 64) if a >= 1 << 63 else a


def _codes64(bits, hi, mid, lo, n, b, h):
    """The ``bits``-bit codes of inputs ``128 b + 64 h + (0..63)`` of row ``n`` (fields ``2h, 2h + 1``): uint8x64.

    A plane row's 32 bytes go to both halves of a 512-bit vector; one ``vgf2p8affineqb`` per plane
    moves field ``2h`` (lower half) and ``2h + 1`` (upper half) to the code's bits for that plane (its
    matrix differs per qword), and the planes are OR-ed. ``h`` is an unrolled loop variable (0 or 1).
    """
    def move(v, src, width, dst):
        """``src[h]``: the source bit of the field in the (lower, upper) half for ``h`` = 0 and 1."""
        def matrix(lower, upper):
            return T.reinterpret("uint8x64", T.vectorcombine(
                "int64x8", T.broadcast(T.int64(_gf2_matrix(lower, dst, width)), 4),
                T.broadcast(T.int64(_gf2_matrix(upper, dst, width)), 4)))
        a = T.Select(h == 0, matrix(*src[0]), matrix(*src[1]))
        return T.call_llvm_pure_intrin("uint8x64", "llvm.x86.vgf2p8affineqb.512", v, a, T.int8(0))

    def both(plane):
        v = plane[n, _ramp(b * 32, _W)]
        return T.vectorcombine("uint8x64", v, v)

    fields = ((0, 2), (4, 6))  # a 2-bit plane: fields 2h and 2h + 1 start at bits 4h and 4h + 2
    c = move(both(hi), fields, 2, bits - 2)
    if bits >= 4:
        c = T.bitwise_or(c, move(both(mid), fields, 2, bits - 4))
    if bits == 8:  # the lo plane's 64 bytes: low nibbles are inputs 0..63, high nibbles 64..127
        c = T.bitwise_or(c, move(lo[n, _ramp(b * 64, 64)], ((0, 0), (4, 4)), 4, 0))
    return c


def _prefetch(buf, row, col):
    """``llvm.prefetch`` (read, into all cache levels) of the line holding ``buf[row, col]``."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buf[row, col]), T.int32(0), T.int32(3),
                              T.int32(1))


@functools.lru_cache(maxsize=256)  # a model repeats its shapes; a PrimFunc is immutable
def decode_func(m: int, n: int, k: int, bits: int, *, group_size: int = BLOCK, dtype: str = "float32",
                bias: bool = False, affine: str = "offset", schedule: str | None = None,
                rows_per_task: int = 64, m_tile: int = 4, prefetch_rows: int = 2,
                x_digits: int | None = None) -> tvm.tirx.PrimFunc:
    """The fused unpack-dequantize GEMM ``y = x @ W_b^T (+ bias)`` for small ``m`` (see the module docstring).

    Arguments, in order: ``x [m, k]`` (dtype), the view's planes (``hi [n, k/4]``, ``mid [n, k/4]``,
    ``lo [n, k/2]``, uint8, only those ``bits`` reads), ``scale [n, k/G]`` and ``offset`` (or ``zero``)
    ``[n, k/G]`` float16, ``bias [n]`` (dtype; only when ``bias``), ``y [m, n]`` (dtype, written).
    """
    schedule = schedule or default_schedule()
    _check(n, k, bits, group_size, dtype, affine, schedule)
    kb, ng, bpg = k // BLOCK, k // group_size, group_size // BLOCK
    P = X_DIGITS if x_digits is None else x_digits
    if P not in (1, 2, 3):
        raise ValueError(f"x_digits must be 1, 2 or 3, not {x_digits}")
    R = 127 * 256 ** (P - 1)  # x / max|x| of its block, times R, rounded: P balanced base-256 digits (int8)
    step_b = float(1 << (8 - bits))
    mid_b = (step_b - 1) / 2
    gl = _lanes(ng)
    rpt = next(r for r in range(min(rows_per_task, n), 0, -1) if n % r == 0)
    MT = next(t for t in range(min(m_tile, m), 0, -1) if m % t == 0)
    vnni, wide = schedule != "fma", schedule == "vnni512"
    # vnni512: one 512-bit vpdpbusd takes 64 codes (two fields of a block); vnni: 256-bit, 32 codes (one field)
    vl, cw = (16, 64) if wide else (8, 32)  # int32 lanes of an accumulator, codes per instruction
    intrin, codes = (_VNNI512, _codes64) if wide else (_VNNI, _codes)
    # Horner in int32 when a lane's whole sum fits: (products per lane) x (largest code) x (largest |X|)
    horner = (BLOCK // vl) * ((1 << bits) - 1) * (R + 1) < 2 ** 31
    acc_n = MT if horner else MT * P
    yl = 16 if wide else 8  # fp32 lanes of a yacc accumulator in use
    NY = 2 if kb % 2 == 0 else 1

    @T.macro
    def body(x, hi, mid, lo, scale, offset, bias_b, y):
        xs = T.alloc_buffer((m, ng), "float32")  # exact fp32 sums of x per group (for the offsets)
        sx = T.alloc_buffer((m, kb), "float32")  # fixed-point step of x per block
        xd = T.alloc_buffer((m, P, k), "int8")  # base-256 digits of x / sx, least significant first
        xf = T.alloc_buffer((m, k), "float32")  # x in fp32 (the fma schedule)
        for mg in T.parallel(m * ng):  # x's digits, 16 lanes at a time (a block is 8 vectors)
            va = T.alloc_buffer((16,), "float32", scope="local")  # lane-wise max |x|, then its tree
            vs = T.alloc_buffer((16,), "float32", scope="local")  # lane-wise sums of x over the group, then its tree
            xb = T.alloc_buffer((1,), "float32", scope="local")
            xi = T.alloc_buffer((16,), "int32", scope="local")
            vs[_ramp(0, 16)] = T.broadcast(T.float32(0), 16)
            for bb in range(bpg):
                va[_ramp(0, 16)] = T.broadcast(T.float32(0), 16)
                for c in T.unroll(BLOCK // 16):
                    v = T.Cast("float32x16", x[mg // ng, _ramp((mg % ng) * group_size + bb * BLOCK + c * 16, 16)])
                    va[_ramp(0, 16)] = T.max(va[_ramp(0, 16)], T.abs(v))
                    vs[_ramp(0, 16)] = vs[_ramp(0, 16)] + v
                fold_lanes(va, 0, 16, True)
                va[0] = T.max(va[0], va[1])
                sx[mg // ng, (mg % ng) * bpg + bb] = va[0] * T.float32(1 / R)
                xb[0] = T.if_then_else(va[0] > T.float32(0), T.float32(R) / va[0], T.float32(0))
                for c in T.unroll(BLOCK // 16):
                    kk = (mg % ng) * group_size + bb * BLOCK + c * 16
                    if vnni:  # balanced base-256 digits, least significant first: X = sum_p d_p 256^p
                        xi[_ramp(0, 16)] = T.Cast("int32x16", T.nearbyint(
                            T.Cast("float32x16", x[mg // ng, _ramp(kk, 16)]) * T.broadcast(xb[0], 16)))
                        for p in T.unroll(P - 1):
                            xd[mg // ng, p, _ramp(kk, 16)] = T.Cast("int8x16", T.bitwise_and(
                                xi[_ramp(0, 16)] + T.broadcast(128, 16), T.broadcast(255, 16)) - T.broadcast(128, 16))
                            xi[_ramp(0, 16)] = T.shift_right(
                                xi[_ramp(0, 16)] - T.Cast("int32x16", xd[mg // ng, p, _ramp(kk, 16)]), T.broadcast(8, 16))
                        xd[mg // ng, P - 1, _ramp(kk, 16)] = T.Cast("int8x16", xi[_ramp(0, 16)])
                    else:
                        xf[mg // ng, _ramp(kk, 16)] = T.Cast("float32x16", x[mg // ng, _ramp(kk, 16)])
            fold_lanes(vs, 0, 16, False)
            xs[mg // ng, mg % ng] = vs[0] + vs[1]
        for task in T.parallel(n // rpt):  # rows in chunks of rpt: a task's scratch is allocated once
            yacc = T.alloc_buffer((MT * NY * 16,), "float32", scope="local")
            acc = T.alloc_buffer((acc_n * vl,), "int32", scope="local")
            facc = T.alloc_buffer((MT * _W,), "float32", scope="local")
            cf = T.alloc_buffer((_W,), "float32", scope="local")
            gacc = T.alloc_buffer((MT * gl,), "float32", scope="local")
            tot = T.alloc_buffer((1,), "float32", scope="local")
            comb = T.alloc_buffer((vl,), "float32", scope="local")
            wb = T.alloc_buffer((MT * kb,), "float32", scope="local")  # scale x x's step, per x row and block
            for r in range(rpt):
                row = task * rpt + r
                if prefetch_rows > 0:  # software prefetch of the row prefetch_rows ahead: its planes, scale, offset
                    if row + prefetch_rows < n:
                        for c in range(k // 4 // 64):
                            T.evaluate(_prefetch(hi, row + prefetch_rows, c * 64))
                            if bits >= 4:
                                T.evaluate(_prefetch(mid, row + prefetch_rows, c * 64))
                            if bits == 8:
                                T.evaluate(_prefetch(lo, row + prefetch_rows, c * 128))
                                T.evaluate(_prefetch(lo, row + prefetch_rows, c * 128 + 64))
                        for c in range((ng * 2 + 63) // 64):
                            T.evaluate(_prefetch(scale, row + prefetch_rows, c * 32))
                            T.evaluate(_prefetch(offset, row + prefetch_rows, c * 32))
                for mt in range(m // MT):  # x rows in tiles of MT: each tile's sums stay in registers
                    for i in T.unroll(MT):
                        for u in T.unroll(NY):
                            yacc[_ramp((i * NY + u) * 16, 16)] = T.broadcast(T.float32(0), 16)
                        facc[_ramp(i * _W, _W)] = T.broadcast(T.float32(0), _W)
                        for b in range(kb):
                            wb[i * kb + b] = T.Cast("float32", scale[row, b // bpg]) * T.if_then_else(
                                vnni, sx[mt * MT + i, b], T.float32(1))
                    for b2 in range(kb // NY):  # NY blocks per step, each into its own yacc (no FMA chain)
                        for u in T.unroll(NY):
                            b = b2 * NY + u
                            if vnni and horner:  # one int32 sum per x row: digits top first, x 256 between
                                for i in T.unroll(MT):
                                    acc[_ramp(i * vl, vl)] = T.broadcast(T.int32(0), vl)
                                for p in T.unroll(P):
                                    for i in T.unroll(MT):
                                        acc[_ramp(i * vl, vl)] = T.shift_left(acc[_ramp(i * vl, vl)], T.broadcast(8, vl))
                                    for f in T.unroll(BLOCK // cw):
                                        for i in T.unroll(MT):
                                            acc[_ramp(i * vl, vl)] = T.call_llvm_pure_intrin(
                                                f"int32x{vl}", intrin, acc[_ramp(i * vl, vl)], codes(bits, hi, mid, lo, row, b, f),
                                                xd[mt * MT + i, P - 1 - p, _ramp(b * BLOCK + f * cw, cw)])
                                for i in T.unroll(MT):
                                    yacc[_ramp((i * NY + u) * 16, vl)] = yacc[_ramp((i * NY + u) * 16, vl)] + T.Cast(
                                        f"float32x{vl}", acc[_ramp(i * vl, vl)]) * T.broadcast(wb[i * kb + b], vl)
                            elif vnni:  # one int32 sum per digit, combined in fp32 (their sum could overflow int32)
                                for i in T.unroll(MT * P):
                                    acc[_ramp(i * vl, vl)] = T.broadcast(T.int32(0), vl)
                                for f in T.unroll(BLOCK // cw):
                                    for i in T.unroll(MT):
                                        for p in T.unroll(P):
                                            acc[_ramp((i * P + p) * vl, vl)] = T.call_llvm_pure_intrin(
                                                f"int32x{vl}", intrin, acc[_ramp((i * P + p) * vl, vl)],
                                                codes(bits, hi, mid, lo, row, b, f), xd[mt * MT + i, p, _ramp(b * BLOCK + f * cw, cw)])
                                for i in T.unroll(MT):
                                    comb[_ramp(0, vl)] = T.Cast(f"float32x{vl}", acc[_ramp((i * P + P - 1) * vl, vl)])
                                    for p in T.unroll(P - 1):
                                        comb[_ramp(0, vl)] = comb[_ramp(0, vl)] * T.broadcast(T.float32(256), vl) + T.Cast(
                                            f"float32x{vl}", acc[_ramp((i * P + P - 2 - p) * vl, vl)])
                                    yacc[_ramp((i * NY + u) * 16, vl)] = yacc[_ramp((i * NY + u) * 16, vl)] + comb[_ramp(0, vl)] * T.broadcast(
                                        wb[i * kb + b], vl)
                            else:
                                for i in T.unroll(MT):
                                    facc[_ramp(i * _W, _W)] = T.broadcast(T.float32(0), _W)
                                for f in T.unroll(4):
                                    cf[_ramp(0, _W)] = T.Cast("float32x32", _codes(bits, hi, mid, lo, row, b, f))
                                    for i in T.unroll(MT):
                                        facc[_ramp(i * _W, _W)] = facc[_ramp(i * _W, _W)] + cf[_ramp(0, _W)] * xf[
                                            mt * MT + i, _ramp(b * BLOCK + f * _W, _W)]
                                for i in T.unroll(MT):
                                    for h in T.unroll(4):
                                        yacc[_ramp((i * NY + u) * 16, 8)] = yacc[_ramp((i * NY + u) * 16, 8)] + facc[
                                            _ramp(i * _W + h * 8, 8)] * T.broadcast(wb[i * kb + b], 8)
                    for i in T.unroll(MT):
                        gacc[_ramp(i * gl, gl)] = _bc(T.float32(0), gl)
                        for g in range(ng // gl):
                            if affine == "offset":
                                gacc[_ramp(i * gl, gl)] = gacc[_ramp(i * gl, gl)] + T.Cast(
                                    _vt("float32", gl), offset[row, _ramp(g * gl, gl)]) * xs[mt * MT + i, _ramp(g * gl, gl)]
                            else:  # scale * (c - (z - m_b) / step_b): offset = -scale * (z - m_b) / step_b
                                gacc[_ramp(i * gl, gl)] = gacc[_ramp(i * gl, gl)] - T.Cast(
                                    _vt("float32", gl), scale[row, _ramp(g * gl, gl)]) * ((T.Cast(
                                        _vt("float32", gl), offset[row, _ramp(g * gl, gl)]) - _bc(T.float32(mid_b), gl))
                                        * _bc(T.float32(1 / step_b), gl)) * xs[mt * MT + i, _ramp(g * gl, gl)]
                        # the row's sum as a tree over the accumulators' lanes (a serial sum is a ~30-add chain)
                        if NY == 2:
                            yacc[_ramp(i * NY * 16, yl)] = yacc[_ramp(i * NY * 16, yl)] + yacc[_ramp(i * NY * 16 + 16, yl)]
                        for c in T.unroll(gl // min(gl, yl)):
                            yacc[_ramp(i * NY * 16, min(gl, yl))] = yacc[_ramp(i * NY * 16, min(gl, yl))] + gacc[
                                _ramp(i * gl + c * min(gl, yl), min(gl, yl))]
                        fold_lanes(yacc, i * NY * 16, yl, False)
                        tot[0] = yacc[i * NY * 16] + yacc[i * NY * 16 + 1]
                        if bias:
                            tot[0] = tot[0] + T.Cast("float32", bias_b[row])
                        y[mt * MT + i, row] = T.Cast(dtype, tot[0])

    return _signature(body, m, n, k, ng, bits, dtype, bias)


@functools.lru_cache(maxsize=64)
def dequantize_func(n: int, k: int, bits: int, *, group_size: int = BLOCK, dtype: str = "float32",
                    affine: str = "offset") -> tvm.tirx.PrimFunc:
    """``W_b`` as ``dtype`` ``[n, k]`` from the view's planes: arguments planes..., scale, offset (or zero), w (written)."""
    _check(n, k, bits, group_size, dtype, affine, "fma")
    kb, ng, bpg = k // BLOCK, k // group_size, group_size // BLOCK
    step_b = float(1 << (8 - bits))
    mid_b = (step_b - 1) / 2

    @T.macro
    def body(hi, mid, lo, scale, offset, w):
        for row in T.parallel(n):
            for b in range(kb):
                s = T.Cast("float32", scale[row, b // bpg])
                if affine == "offset":
                    o = T.Cast("float32", offset[row, b // bpg])
                else:
                    o = -s * (T.Cast("float32", offset[row, b // bpg]) - T.float32(mid_b)) * T.float32(1 / step_b)
                for f in T.unroll(4):
                    w[row, _ramp(b * BLOCK + f * _W, _W)] = T.Cast(
                        f"{dtype}x{_W}", T.Cast("float32x32", _codes(bits, hi, mid, lo, row, b, f))
                        * T.broadcast(s, _W) + T.broadcast(o, _W))

    return _signature(body, None, n, k, ng, bits, dtype, False)


def _signature(body, m: int | None, n: int, k: int, ng: int, bits: int, dtype: str, bias: bool) -> tvm.tirx.PrimFunc:
    """``body`` (a TIR macro) as a PrimFunc whose parameters are only what the ``bits``-bit view reads:
    its planes (``hi``; ``hi, mid``; ``hi, mid, lo``), scale, offset, the bias when there is one, and
    ``x`` and ``y`` (``m`` given: the GEMM) or ``w`` (``m`` None: the dequantizer). A body that read
    a plane left out of its signature would not parse."""
    xs, ys, hs, ls, ss = (m or 1, k), (m or 1, n), (n, k // 4), (n, k // 2), (n, ng)  # shapes
    if m is None:
        if bits == 2:
            @T.prim_func(private=True)
            def f(hi: T.Buffer(hs, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), w: T.Buffer((n, k), dtype)):
                T.func_attr({"tirx.noalias": True})
                body(hi, None, None, scale, offset, w)
        elif bits == 4:
            @T.prim_func(private=True)
            def f(hi: T.Buffer(hs, "uint8"), mid: T.Buffer(hs, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), w: T.Buffer((n, k), dtype)):
                T.func_attr({"tirx.noalias": True})
                body(hi, mid, None, scale, offset, w)
        else:
            @T.prim_func(private=True)
            def f(hi: T.Buffer(hs, "uint8"), mid: T.Buffer(hs, "uint8"), lo: T.Buffer(ls, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), w: T.Buffer((n, k), dtype)):
                T.func_attr({"tirx.noalias": True})
                body(hi, mid, lo, scale, offset, w)
        names = ["hi", "mid", "lo"][:len(PLANES_OF[bits])] + ["scale", "offset", "w"]
    else:
        if bits == 2 and not bias:
            @T.prim_func(private=True)
            def f(x: T.Buffer(xs, dtype), hi: T.Buffer(hs, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), y: T.Buffer(ys, dtype)):
                T.func_attr({"tirx.noalias": True})
                body(x, hi, None, None, scale, offset, None, y)
        elif bits == 2:
            @T.prim_func(private=True)
            def f(x: T.Buffer(xs, dtype), hi: T.Buffer(hs, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), bias: T.Buffer((n,), dtype), y: T.Buffer(ys, dtype)):
                T.func_attr({"tirx.noalias": True})
                body(x, hi, None, None, scale, offset, bias, y)
        elif bits == 4 and not bias:
            @T.prim_func(private=True)
            def f(x: T.Buffer(xs, dtype), hi: T.Buffer(hs, "uint8"), mid: T.Buffer(hs, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), y: T.Buffer(ys, dtype)):
                T.func_attr({"tirx.noalias": True})
                body(x, hi, mid, None, scale, offset, None, y)
        elif bits == 4:
            @T.prim_func(private=True)
            def f(x: T.Buffer(xs, dtype), hi: T.Buffer(hs, "uint8"), mid: T.Buffer(hs, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), bias: T.Buffer((n,), dtype), y: T.Buffer(ys, dtype)):
                T.func_attr({"tirx.noalias": True})
                body(x, hi, mid, None, scale, offset, bias, y)
        elif not bias:
            @T.prim_func(private=True)
            def f(x: T.Buffer(xs, dtype), hi: T.Buffer(hs, "uint8"), mid: T.Buffer(hs, "uint8"), lo: T.Buffer(ls, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), y: T.Buffer(ys, dtype)):
                T.func_attr({"tirx.noalias": True})
                body(x, hi, mid, lo, scale, offset, None, y)
        else:
            @T.prim_func(private=True)
            def f(x: T.Buffer(xs, dtype), hi: T.Buffer(hs, "uint8"), mid: T.Buffer(hs, "uint8"), lo: T.Buffer(ls, "uint8"), scale: T.Buffer(ss, "float16"), offset: T.Buffer(ss, "float16"), bias: T.Buffer((n,), dtype), y: T.Buffer(ys, dtype)):
                T.func_attr({"tirx.noalias": True})
                body(x, hi, mid, lo, scale, offset, bias, y)
        names = ["x"] + ["hi", "mid", "lo"][:len(PLANES_OF[bits])] + ["scale", "offset"] + (["bias"] if bias else []) + ["y"]
    return f.with_attr("global_symbol", "main").with_attr("kiln.lowbit_params", names)


@dataclass
class LowbitKernel:
    """One compiled kernel: ``kernel(*tensors)`` with the tensors its signature names (``params``, the
    output last), all contiguous torch CPU tensors, passed to TVM zero-copy (DLPack)."""

    params: tuple[str, ...]
    function: tvm.ffi.Function
    module: tvm.runtime.Module

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) != len(self.params):
            raise TypeError(f"this kernel takes {', '.join(self.params)}; got {len(tensors)} tensors")
        self.function(*tensors)
        return tensors[-1]


def build(func: tvm.tirx.PrimFunc, target: tvm.target.Target | None = None) -> LowbitKernel:
    """Compile one generated PrimFunc with LLVM for ``target`` (this host by default)."""
    module = tvm.compile(tvm.IRModule({"main": func}), target=target or host_target())
    return LowbitKernel(tuple(func.attrs["kiln.lowbit_params"]), module["main"], module)



# -- kiln::nested_linear in the cpu target's TVM partitions ------------------------------------------------------

DECODE_MAX_ROWS = 8  # up to this many rows of x: the fused kernel; more: dequantize + the library GEMM


def _nested_linear_op():
    from ...ir import ops  # noqa: F401  (defines kiln::nested_linear)
    return torch.ops.kiln.nested_linear.default


NESTED_LINEAR = _nested_linear_op()


def _nested_args(node):
    x, hi, mid, lo, scale, zero, bias, bits, group_size = node.args
    return x, {"hi": hi, "mid": mid, "lo": lo}, scale, zero, bias, bits, group_size


def supports_nested_linear(node) -> bool:
    """Whether ``convert_nested_linear`` lowers this ``kiln::nested_linear`` node: x float32 or bfloat16 (a
    bias, if any, of x's dtype), static shapes, and the planes, scale and zero given as tensors."""
    x, planes, scale, zero, bias, bits, group_size = _nested_args(node)
    val = x.meta.get("val") if hasattr(x, "meta") else None
    if val is None or val.dtype not in (torch.float32, torch.bfloat16) or not all(isinstance(d, int) for d in val.shape):
        return False
    if bias is not None and getattr(bias, "meta", {}).get("val", None) is not None and bias.meta["val"].dtype != val.dtype:
        return False
    return bits in PLANES_OF and all(planes[p] is not None for p in PLANES_OF[bits]) and group_size % BLOCK == 0


def convert_nested_linear(bb, node, value_of, target: tvm.target.Target | None = None):
    """Emit ``node`` (``kiln::nested_linear``) into Relax: ``R.call_tir`` of this module's kernel for its view.

    ``bb`` is the converter's ``relax.BlockBuilder`` and ``value_of(fx_node)`` the Relax value of an
    argument. Up to ``DECODE_MAX_ROWS`` rows of x: the fused ``decode_func``; more: ``dequantize_func``
    then the cpu dispatch's ``kiln.linear`` / ``kiln.linear_bias`` (PyTorch's GEMM). The PrimFuncs are
    marked ``tirx.is_scheduled``: kiln's schedule rules and tuning leave them as generated.
    """
    from tvm import relax

    x, planes, scale, zero, bias, bits, group_size = _nested_args(node)
    shape = list(x.meta["val"].shape)
    dtype = str(x.meta["val"].dtype).split(".")[1]
    k, n = shape[-1], planes["hi"].meta["val"].shape[0]
    m = math.prod(shape[:-1])
    view = [value_of(planes[p]) for p in PLANES_OF[bits]] + [value_of(scale), value_of(zero)]
    x2 = value_of(x)
    if len(shape) != 2:
        x2 = bb.emit(relax.op.reshape(x2, (m, k)))
    if m <= DECODE_MAX_ROWS:
        schedule = default_schedule(target)
        func = decode_func(m, n, k, bits, group_size=group_size, dtype=dtype, bias=bias is not None, affine="zero",
                           schedule=schedule).with_attr("kiln.schedule", f"kiln.lowbit.{schedule}")
        gv = _add_kernel(bb, func, f"kiln_nested_linear{bits}_m{m}_n{n}_k{k}{'_bias' if bias is not None else ''}")
        args = [x2, *view] + ([value_of(bias)] if bias is not None else [])
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType([m, n], dtype)))
    else:
        func = dequantize_func(n, k, bits, group_size=group_size, dtype=dtype, affine="zero").with_attr(
            "kiln.schedule", "kiln.lowbit.dequantize")
        gv = _add_kernel(bb, func, f"kiln_nested_dequantize{bits}_n{n}_k{k}")
        w = bb.emit(relax.call_tir(gv, view, relax.TensorType([n, k], dtype)))
        gemm = [x2, w] + ([value_of(bias)] if bias is not None else []) + [relax.prim_value(0)]
        y = bb.emit(relax.call_dps_packed("kiln.linear_bias" if bias is not None else "kiln.linear", gemm,
                                          relax.TensorType([m, n], dtype)))
    return y if len(shape) == 2 else bb.emit(relax.op.reshape(y, (*shape[:-1], n)))


def _add_kernel(bb, func, name: str):
    """Add ``func`` to the module being built under ``name`` (once per distinct kernel), marked scheduled."""
    return bb.add_func(func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True), name)
