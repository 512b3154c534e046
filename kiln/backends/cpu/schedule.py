"""The CPU target's schedule rules for every TIR kernel left after library dispatch and fusion.

TVM 0.27's ``s_tir.dlight.cpu`` has two rules: ``Reduction`` (softmax,
layer/RMS norm: rows in parallel, but each row summed by a scalar chain) and
``GEMV``. Element-wise kernels (the bulk of what stays in TIR: RoPE, SwiGLU's
``silu * up``, activations, casts, copies for transposes) have no CPU rule,
and unscheduled TIR runs single-threaded and scalar. kiln's rules:

- ``RowReduction``: norms and other row reductions, with vectorized partial
  sums (layer norm at 197x512: 320 us with dlight's rule, 66 us with this);
- ``Elementwise``: parallel rows x vectorized innermost axis;
- dlight's ``Reduction`` and ``GEMV`` for the shapes ours do not take;
- ``RowParallel``: whatever is left (gathers, scans) at least runs its rows in parallel.

Rules are tried in order (``Elementwise`` first, ``default_rules``); the first that returns a
schedule wins, and ``kiln.backends.tvm.schedule.applied_rule`` reads back which one did (the
report lists it per kernel).
"""
from __future__ import annotations

import re

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

from ..tvm.schedule import NamedRule

# Below this many output elements (128 KiB of fp32) a kernel runs on one core: a parallel launch costs
# ~2-3 us. TVM's pool has more than one thread only while the program runs PyTorch on one
# (``kiln.runtime.kernels.tvm_vm``), so its threads never spin against PyTorch's OpenMP team. A DyQ decode
# step's KV-cache concatenations ([1, 16, 65, 128]) split across two cores: 10.4 -> 9.8 ms per step (was
# 2**18 elements, from before the pool was sized).
PARALLEL_MIN_ELEMENTS = 1 << 15


def _vector_lanes(target: Target, dtype_bits: int) -> int:
    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // dtype_bits, 1)


def _largest_divisor(extent: int, limit: int) -> int:
    for lanes in (limit, 16, 8, 4, 2):
        if lanes <= limit and extent % lanes == 0:
            return lanes
    return 1


def _output_bits(sch: s_tir.Schedule, block) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


class Elementwise(CPUScheduleRule):
    """All-injective kernels: inline into the outputs, then parallel rows x vectorized last axis.

    The innermost axis stays its own loop (not fused with the rest) so that
    broadcast and transposed reads keep affine indices the vectorizer can
    turn into vector loads, instead of a div/mod per lane.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or not all(b.is_injective() for b in blocks) or any(_is_reduction(sch, b) for b in blocks):
            return None
        for block in _inline_bounded(sch, blocks):
            _parallel_vectorize(sch, block.block_rv, target)
        return sch


# Characters of TIR a producer's value may be copied into its consumers, all reads
# together: a GELU's inner polynomial read by tanh's is about 1500; erf's scaled input
# x / sqrt(2), read 21 times by its rational polynomial, about 5800 (inlined, GELU is one pass
# over memory instead of two: 487 -> 362 us at [128, 3072], one thread; LLVM folds the copies).
INLINE_BUDGET = 8000


def _inline_bounded(sch: s_tir.Schedule, blocks) -> list:
    """dlight's ``try_inline``, but a producer whose value its consumers read several times is
    inlined only while the copies stay small; otherwise it is computed once into its buffer.

    Inlining substitutes the producer's expression at every read: TVM's fast
    polynomials read their input several times, so ``exp(tanh(gelu(sigmoid(x))))``
    grew exponentially and took 160 s to compile (clamp chains alike).
    """
    remaining = list(blocks)
    progress = True
    while progress:
        progress = False
        for block in list(remaining):
            rv = block.block_rv
            # compute_inline copies rv's value into its consumers; reverse_compute_inline copies
            # rv's producers' values into rv.
            for inline, producers in ((sch.compute_inline, [rv]), (sch.reverse_compute_inline, sch.get_producers(rv))):
                if not all(_copies_small(sch, p) for p in producers):
                    continue
                try:
                    inline(rv)
                except Exception:  # noqa: BLE001 - TVM refuses: the block stays
                    continue
                remaining.remove(block)
                progress = True
                break
    return remaining


def _copies_small(sch: s_tir.Schedule, producer) -> bool:
    """Whether substituting ``producer``'s value at each of its consumers' reads stays within the budget."""
    stmt = sch.get(producer)
    if not stmt.writes:
        return True
    name = stmt.writes[0].source.name
    reads = sum(str(sch.get(c).body).count(f"{name}[") for c in sch.get_consumers(producer))
    return reads <= 1 or len(str(stmt.body)) * reads <= INLINE_BUDGET


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    """A block with an init statement: a reduction, even when its reduction axis has extent 1.

    ``normalize_prim_func`` drops unit axes, so ``x.mean(-1)`` of an [N, 1] tensor
    looks injective; inlining the epilogue into it then applied ``rsqrt`` inside
    the accumulation (``rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)`` wrong by 17).
    """
    return sch.get(block.block_rv).init is not None


def _parallel_vectorize(sch: s_tir.Schedule, block, target: Target) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [get_extent(sch, lp) for lp in loops]
    if not all(isinstance(e, int) for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    lanes = _largest_divisor(extents[-1], _vector_lanes(target, _output_bits(sch, block)))
    inner = loops[-1]
    outer = list(loops[:-1])
    if lanes > 1:
        rest, vec = sch.split(inner, factors=[None, lanes])
        sch.vectorize(vec)
        outer.append(rest)
    elif len(loops) > 1:
        outer = list(loops)
    if total >= PARALLEL_MIN_ELEMENTS and outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


class RowReduction(CPUScheduleRule):
    """Row-wise reductions with an injective epilogue (layer norm, RMS norm, softmax), vectorized.

    Like ``dlight.cpu.Reduction`` (rows in parallel, every block computed per
    row), but each reduction first splits its axis into ``lanes`` partial sums
    (``rfactor``) that accumulate as one vector: a scalar sum is a chain of
    dependent adds, which made TVM's layer norm 2x slower than PyTorch's. The
    rfactor happens before ``compute_at``, where TVM still allows it.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or len(blocks) < 2 or not blocks[-1].is_injective():
            return None
        reductions = [b for b in blocks if not b.is_injective()]
        # Every block: spatial axes, then at most one reduction axis (the row).
        if not reductions or not all(re.fullmatch("S+R?", b.dom_kind()) for b in blocks):
            return None
        lead = min(len(b.dom_kind().rstrip("R")) for b in blocks)
        # The rows: a reduction's spatial extent. The last block's first ``lead`` loops must be those rows to
        # compute every block per row; with one row, normalization leaves the reductions a unit spatial axis but
        # the elementwise blocks none, so their first loop runs over the row's elements instead.
        rows = _elements(sch, sch.get_loops(reductions[0].block_rv)[:-1])
        one_row = _elements(sch, sch.get_loops(blocks[-1].block_rv)[:lead]) != rows
        if one_row and rows != 1:
            return None
        lanes = _vector_lanes(target, _output_bits(sch, blocks[-1].block_rv))
        factored = {}  # reduction block name -> its rfactor block
        for block in reductions:
            loops = sch.get_loops(block.block_rv)
            extent = get_extent(sch, loops[-1])
            if not isinstance(extent, int) or extent % lanes or extent < 2 * lanes:
                continue
            _, lane = sch.split(loops[-1], factors=[None, lanes])
            # The lane axis goes last in the partial-sum buffer, so a vector of lanes is contiguous.
            ndim = len(sch.get(block.block_rv).writes[0].source.shape)
            factored[block.name] = sch.rfactor(lane, factor_axis=ndim)
        last = blocks[-1].block_rv
        if one_row:
            # A decode step's [1, 1, d] norm: there is no row loop to compute the blocks under (computing the
            # reduction under the last block's loop over the row's elements summed the whole row once per
            # element: 0.34 ms for d = 2048). Each block keeps its own loop.
            for rf in factored.values():
                sch.vectorize(sch.get_loops(rf)[-1])  # the lanes, innermost as split
            for block in blocks:
                if block.is_injective():
                    _vectorize_innermost(sch, block.block_rv, lanes)
            return sch
        loops = sch.get_loops(last)
        large = _elements(sch, loops) >= PARALLEL_MIN_ELEMENTS
        row = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
        if large:
            sch.parallel(row)
        if len(loops) > lead:
            # Only an axis inside the row: when the row loop is the last block's innermost
            # (a reduction to one value per row, ``x.mean(-1)``), vectorizing it would vectorize
            # the reductions computed under it across rows: wrong sums, or TVM's
            # "VectorizeLoop before LiftStorageAlloc" once a partial-sum buffer is inside.
            _vectorize_innermost(sch, last, lanes)
        # Consumers first: compute_at needs every consumer of a block already under ``row``.
        for block in reversed(blocks[:-1]):
            if _writes_output(sch, block.block_rv, func):
                # A second output (the residual sum before a norm) cannot move under
                # ``row``; it keeps its own parallel, vectorized loop.
                _parallel_vectorize(sch, block.block_rv, target)
                continue
            sch.compute_at(block.block_rv, row, preserve_unit_loops=True)
            if block.name in factored:
                sch.compute_at(factored[block.name], row, preserve_unit_loops=True)
        for rf in factored.values():
            # compute_at recreates the loops in block-iter order, lane (rfactor's new
            # spatial iter) first; put it innermost so the partial sums are one vector.
            lane, ko = [lp for lp in sch.get_loops(rf)[1:] if get_extent(sch, lp) != 1]
            sch.reorder(ko, lane)
            sch.vectorize(lane)
        for block in blocks[:-1]:
            if block.is_injective() and not _writes_output(sch, block.block_rv, func):
                _vectorize_innermost(sch, block.block_rv, lanes)
        return sch


def _elements(sch: s_tir.Schedule, loops) -> int:
    total = 1
    for lp in loops:
        extent = get_extent(sch, lp)
        total *= extent if isinstance(extent, int) else PARALLEL_MIN_ELEMENTS
    return total


def _writes_output(sch: s_tir.Schedule, block, func: tirx.PrimFunc) -> bool:
    # Intermediates are allocated in the root block; anything else is a parameter.
    written = sch.get(block).writes[0].source
    return not any(written.same_as(buf) for buf in func.body.block.alloc_buffers)


def _vectorize_innermost(sch: s_tir.Schedule, block, lanes: int) -> None:
    inner = sch.get_loops(block)[-1]
    extent = get_extent(sch, inner)
    if isinstance(extent, int) and extent > 1:
        width = _largest_divisor(extent, lanes)
        if width > 1:
            sch.vectorize(sch.split(inner, factors=[None, width])[1] if extent > width else inner)


class RowParallel(CPUScheduleRule):
    """Fallback: each remaining block runs its leading spatial loops in parallel."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks:
            return None
        changed = False
        # No inlining next to a reduction: an epilogue inlined into a unit-axis reduction
        # would run inside its accumulation (see _is_reduction).
        for block in (blocks if any(_is_reduction(sch, b) for b in blocks) else _inline_bounded(sch, blocks)):
            kinds = block.dom_kind()
            lead = len(kinds) - len(kinds.lstrip("S"))
            loops = sch.get_loops(block.block_rv)[:lead]
            extents = [get_extent(sch, lp) for lp in loops]
            if not loops or not all(isinstance(e, int) for e in extents):
                continue
            rows = 1
            for e in extents:
                rows *= e
            if rows < 2 or rows * _reduction_size(block) < PARALLEL_MIN_ELEMENTS:
                continue
            sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
            changed = True
        return sch if changed else None


def _reduction_size(block) -> int:
    size = 1
    for it in block.iters:
        if it.kind == "R" and isinstance(it.dom, (int, tirx.IntImm)):
            size *= int(it.dom)
    return max(size, 1)


def default_rules() -> list:
    # Elementwise first: it takes only all-injective kernels, and dlight's GEMV rule inlines every
    # block without bound before it checks the kernel's shape (160 s on a chain of activations).
    return [
        NamedRule("kiln.Elementwise", Elementwise()),
        NamedRule("kiln.RowReduction", RowReduction()),
        NamedRule("dlight.cpu.Reduction", dlight.cpu.Reduction()),
        NamedRule("dlight.cpu.GEMV", dlight.cpu.GEMV()),
        NamedRule("kiln.RowParallel", RowParallel()),
    ]

