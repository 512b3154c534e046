"""GEMM kernel selection: time each dispatched GEMM's kernels on this machine, keep the fastest.

The stage after ``library_dispatch``. Every ``linear`` / ``addmm`` the plan
sends to the library can run on one of these, all PyTorch's own kernels:

    mkl        one ``mm``/``addmm`` call: MKL's sgemm, the kernel eager runs (bitwise eager's result)
    mkl_cols   the same call per block of ``COLUMN_BLOCK`` output columns: every
               output element is the same dot product, so bitwise the same; the
               block's output stays in cache (wide LM heads)
    mkl_packed f32 linears whose weight is a constant: MKL's sgemm on the weight packed once at load
               for the program's row count (``tvm_dispatch.pack_f32_weights``): the same kernel
               without packing B on every call, 8-22% faster at 128 rows here; not promised
               bitwise eager's (MKL may take another path for a packed B), held to fp32 tolerance.
               The packed copy holds about the weight's size again in memory while loaded, per
               row count (``CpuOptions(pack_weights=False)``: never packed)
    onednn     oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``):
               another accumulation order, so not bitwise eager (its error
               against a float64 reference is of eager's order; tests hold it
               to fp32 tolerance), and measured up to 1.9x faster on LM
               heads and single-row (decode) GEMMs on an Intel Xeon, slower on
               some others; 1.7-2.9x MKL's at 128 rows on an AMD EPYC (Zen 5),
               where MKL does not take its AVX-512 paths
    onednn_packed  f32 linears whose weight is a constant: oneDNN's inner product on the
               weight packed once at load into its blocked layout for the program's row
               count (``tvm_dispatch.pack_onednn_f32_weights``): bitwise ``onednn``'s result
               without reordering the weight on every call, 4-12% faster at 128 rows on
               that EPYC; the weight's size again in memory while loaded (``pack_weights``)

Which is fastest depends on the shape and the CPU, so it is measured, not
guessed: the runtime's own functions (``tvm_dispatch``) run on random tensors
of the node's shapes, interleaved, for about ``BUDGET_S`` per shape. A kernel
other than a single ``mkl`` call is kept only when it is at least ``MARGIN``
faster than the best of those before it, so noise never trades eager's exact
kernel for a tie. Results are memoised per process (a model's layers share
a handful of shapes; LLM shape buckets share most of theirs).

bf16 linears (``measure`` mode) go to oneDNN without measuring: the runtime packs their weights once at
load into oneDNN's blocked layout (``tvm_dispatch.pack_bf16_weights``), 1.3-1.6x faster than ``mm``,
which reorders the plain weight every call; an input that is not all finite runs eager's ``mm`` there
(oneDNN's bf16 inner product spread a NaN into the row before: tests/fuzz FINDINGS F2).

Modes (``CompileOptions.gemm_kernels``): ``measure`` (the default: all of them),
``mkl`` (only eager's kernel, blocked where that measured faster: GEMM
results bitwise eager's) and ``onednn`` (oneDNN wherever it applies, not
measured; for tests and for comparing).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from ...errors import UnknownNameError
from ...ir.meta import dtype_from_name, dtype_name
from ...runtime.kernels import tvm_dispatch
from ..tvm.dispatch import Args, DispatchRule, absorbed, plan_dispatch
from .dispatch import MKL_PACKED_RULES, ONEDNN_PACKED_RULES, ONEDNN_RULES, RULES

MODES = ("measure", "mkl", "onednn")
COLUMN_BLOCK = 1024  # measured on LM heads here: 512-2048 within 4% of each other, 256 slower
MARGIN = 0.05  # a kernel replaces the one before it only when this much faster
# ... except these: MKL's packed sgemm is the same library's kernel on a packed copy of the weight, 5-10% faster
# at 128 rows (MiniLM/BERT's shapes, interleaved here), so at 5% a third of the choices flipped between compiles
# ... and oneDNN's on its packed weight is bitwise its plain call's result, a few percent faster
MARGINS = {"mkl_packed": 0.02, "onednn_packed": 0.02}
# mkl_packed only from this many multiply-adds: below it packing saves nothing, and MKL's packed sgemm still
# runs its threads (on a machine with a core taken by another job a 16x64x64 call took 6.6 ms, addmm 29 us)
PACK_MIN_MACS = 1 << 21
# The kernels whose runtime functions return their result: their rules, keyed by the rule each replaces.
RETURNING = {"onednn": ONEDNN_RULES, "mkl_packed": MKL_PACKED_RULES, "onednn_packed": ONEDNN_PACKED_RULES}
# Kernels on a copy of the weight packed at load, and the function packing it for the measurements.
PACKING = {"mkl_packed": tvm_dispatch.pack_f32_weights, "onednn_packed": tvm_dispatch.pack_onednn_f32_weights}
BUDGET_S = 0.1  # measuring time per candidate and shape (at least MIN_ROUNDS rounds)
MIN_ROUNDS, MAX_ROUNDS = 3, 60


@dataclass(frozen=True)
class GemmShape:
    """One dispatched GEMM: ``[m, k] x [k, n] (+ bias)`` through rule ``rule`` (its weight layout)."""

    rule: str
    m: int
    k: int
    n: int
    dtype: str = "f32"  # kiln's dtype name (kiln.ir.meta.DTYPE_NAMES)
    constant_weight: bool = False  # the weight is one of the partition's weights (packable once at load)

    def label(self) -> str:
        dtype = "" if self.dtype == "f32" else f" {self.dtype}"
        return f"{self.rule} [{self.m}x{self.k}] x [{self.k}x{self.n}]{dtype}"


@dataclass
class GemmChoice:
    kernel: str  # "mkl", "mkl_cols" or "onednn"
    us: dict[str, float]  # measured microseconds per candidate (empty: not measured)

    def to_json(self, shape: GemmShape, count: int) -> dict:
        return {"gemm": shape.label(), "nodes": count, "kernel": self.kernel,
                **({"us": {k: round(v, 1) for k, v in self.us.items()}} if self.us else {})}


_MEMO: dict[tuple[str, GemmShape], GemmChoice] = {}


def gemm_shape(rule: DispatchRule, args: Args, constants: frozenset[fx.Node] = frozenset()) -> GemmShape | None:
    """The GEMM a planned node computes, if it is one whose kernel is selectable (``constants``: the weights)."""
    if rule.name not in ONEDNN_RULES:
        return None
    x, w = (args[1], args[2]) if rule.name == "addmm" else (args[0], args[1])
    xs, ws = x.meta["val"].shape, w.meta["val"].shape
    n = ws[1] if rule.name == "addmm" else ws[0]
    dtype = dtype_name(x.meta["val"].dtype)
    return GemmShape(rule.name, math.prod(xs[:-1]), xs[-1], n, dtype, w in constants)


def candidates(shape: GemmShape, mode: str) -> list[str]:
    """Kernels to consider, in order of preference (eager's own first)."""
    names = ["mkl"]
    if shape.n >= 2 * COLUMN_BLOCK:
        names.append("mkl_cols")
    packable = (mode == "measure" and shape.dtype == "f32" and shape.constant_weight and shape.rule in MKL_PACKED_RULES
                and shape.m * shape.k * shape.n >= PACK_MIN_MACS)
    if packable and torch.backends.mkl.is_available():
        names.append("mkl_packed")
    if mode == "measure" and shape.dtype == "f32":
        # bf16 linears: oneDNN on packed weights, not measured (_choice); bf16 addmm: not on oneDNN, whose
        # bf16 inner product spread a NaN of one input row into the output row before it (M=32, K=5;
        # tests/fuzz FINDINGS F2); eager's MKL path does not.
        names.append("onednn")
        if packable and torch.backends.mkldnn.is_available():
            names.append("onednn_packed")
    return names


def _callables(shape: GemmShape, kernels: list[str]) -> dict[str, Callable[[], object]]:
    """The runtime function of each kernel on random tensors of ``shape``, called as the library will."""
    m, k, n = shape.m, shape.k, shape.n
    dtype = dtype_from_name(shape.dtype)
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(k, n, dtype=dtype) if shape.rule == "addmm" else torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype)
    tensors = {"linear": [x, w], "linear_bias": [x, w, b], "addmm": [b, x, w]}[shape.rule]
    out = torch.empty(m, n, dtype=dtype)

    def call(kernel: str) -> Callable[[], object]:
        if kernel in PACKING:
            PACKING[kernel]([(w, m)])  # unpacked again when w dies
        if kernel in RETURNING:
            fn = tvm_dispatch.FUNCTIONS[RETURNING[kernel][shape.rule].function]
            return lambda: fn(*tensors)
        fn = tvm_dispatch.FUNCTIONS[f"kiln.{shape.rule}"]
        block = COLUMN_BLOCK if kernel == "mkl_cols" else 0
        return lambda: fn(*tensors, block, out)
    return {kernel: call(kernel) for kernel in kernels}


def measure(shape: GemmShape, kernels: list[str], budget_s: float = BUDGET_S,
            max_rounds: int = MAX_ROUNDS) -> dict[str, float]:
    """Median microseconds per call of each kernel, interleaved rounds after one warm-up call each.

    Rounds stop after ``budget_s`` per kernel (at least ``MIN_ROUNDS``, at most ``max_rounds``).
    """
    fns = _callables(shape, kernels)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for i in range(max_rounds):
        if i >= MIN_ROUNDS and time.perf_counter() - start > budget_s * len(fns):
            break
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def choose(us: dict[str, float]) -> str:
    """The kernel to run: the first candidate, replaced by each later one at least ``MARGIN`` faster (its own
    margin in ``MARGINS`` where it has one)."""
    names = list(us)
    best = names[0]
    for name in names[1:]:
        if us[name] < us[best] * (1 - MARGINS.get(name, MARGIN)):
            best = name
    return best


def select_gemm_kernels(plan: dict[fx.Node, tuple[DispatchRule, Args]], mode: str = "measure",
                        timer: Callable[[GemmShape, list[str]], dict[str, float]] = measure,
                        constants: frozenset[fx.Node] = frozenset(),
                        ) -> tuple[dict[fx.Node, tuple[DispatchRule, Args]], list[dict]]:
    """``plan`` with each selectable GEMM on its chosen kernel, and a report entry per distinct shape.

    ``constants``: the partition's weight nodes (a GEMM on one may run on a packed copy of it).
    ``timer`` measures candidates (tests pass a fake one).
    """
    if mode not in MODES:
        raise UnknownNameError("GEMM kernel mode", mode, MODES)
    if mode == "mkl":
        plan = _without_fused_calls(plan)
    chosen: dict[fx.Node, tuple[DispatchRule, Args]] = {}
    shapes: dict[GemmShape, list[fx.Node]] = {}
    for node, (rule, args) in plan.items():
        shape = gemm_shape(rule, args, constants)
        if shape is None:
            chosen[node] = (rule, args)
        else:
            shapes.setdefault(shape, []).append(node)
    report = []
    for shape, nodes in shapes.items():
        choice = _choice(shape, mode, timer)
        for node in nodes:
            rule, args = plan[node]
            if choice.kernel in RETURNING:
                chosen[node] = (RETURNING[choice.kernel][rule.name], args[:-1])
            else:
                chosen[node] = (rule, args[:-1] + [COLUMN_BLOCK if choice.kernel == "mkl_cols" else 0])
        report.append(choice.to_json(shape, len(nodes)))
    return {node: chosen[node] for node in plan}, report


def _without_fused_calls(plan: dict[fx.Node, tuple[DispatchRule, Args]]) -> dict[fx.Node, tuple[DispatchRule, Args]]:
    """``plan`` with each call that takes several nodes (bf16 mode's oneDNN linear with its GELU, or with its
    conversion to fp32) undone: the nodes it took planned again by the rules that take one node each (its linear
    then runs eager's MKL kernel, as ``mkl`` mode promises; the rest is lowered to TIR as before the fusion)."""
    fused = {node: entry for node, entry in plan.items() if entry[0].absorbs is not None}
    if not fused:
        return plan
    undone = absorbed(fused)
    replanned = plan_dispatch(next(iter(fused)).graph.owning_module, [r for r in RULES if r.absorbs is None])
    kept = {node: entry for node, entry in plan.items() if node not in fused}
    return {**kept, **{node: replanned[node] for node in undone if node in replanned}}


def _choice(shape: GemmShape, mode: str, timer) -> GemmChoice:
    if mode == "onednn" or (mode == "measure" and shape.dtype == "bf16" and shape.rule in ("linear", "linear_bias")):
        return GemmChoice("onednn", {})
    kernels = candidates(shape, mode)
    if len(kernels) == 1:
        return GemmChoice(kernels[0], {})
    key = (mode, shape)
    if timer is not measure:
        us = timer(shape, kernels)
        return GemmChoice(choose(us), us)
    if key not in _MEMO:
        us = timer(shape, kernels)
        _MEMO[key] = GemmChoice(choose(us), us)
    return _MEMO[key]
