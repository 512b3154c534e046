"""GEMMs and attention in bf16 on an fp32 graph, everything else in fp32 (``CompileOptions.precision="bf16"``).

What it does, when ``CompileOptions.precision`` is ``"bf16"`` (otherwise
nothing): every GEMM-class node (:data:`GEMM_OPS`: linear, matmul, mm, bmm,
addmm, conv2d) and every ``scaled_dot_product_attention`` whose floating-point
tensor inputs are all fp32 computes in bf16, as OpenVINO's default precision
hint and TensorRT's fp16 mode do:

- a stored weight input becomes a bf16 weight, converted once here (the
  artifact stores the bf16 tensor; the fp32 one is dropped when no other node
  reads it: an embedding tied to the LM head keeps its fp32 table);
- an activation input gets a cast to bf16 before the node (one cast per
  value: q, k and v read one), a float attention mask is clamped to bf16's
  range first (fp32's most negative finite value would round to -inf there,
  and a fully masked row would give NaN where fp32 gives a uniform row);
- the node's result is cast back to fp32 right after it, so norms, softmax,
  residual adds and every other op still compute and accumulate in fp32.

Linears reading one input (q, k and v; gate and up) read one cast of it, so
the ``merge_linears`` pass after this one runs them as one wider bf16 GEMM.

Consecutive GEMM-class nodes keep the bf16 value between them: when the
input to cast is, through value-preserving layout ops only
(:data:`LAYOUT_OPS`: view, transpose, clone, ...), the fp32 cast of a bf16
result this pass made, the layout ops are rebuilt on the bf16 value and both
casts go (bf16 -> fp32 -> bf16 is the identity, so this is bitwise the same
result with two memory passes fewer: a linear's output reshaped into
attention heads, attention's output into the output projection). Anything
else in between (RoPE's multiplies, a GELU) is fp32 and keeps its casts,
which the ``cpu`` backend fuses into that elementwise kernel.

On a machine without bf16 units (neither ``avx512_bf16`` nor ``amx_bf16`` in
the CPU flags, or PyTorch's oneDNN not built or not reporting bf16 support)
the pass changes nothing and says so: a log warning, and the stats
``{"precision": "fp32", "requested": "bf16", "bf16_units": False, "reason": ...}``
(emulated bf16 GEMMs run slower than fp32 ones and lose accuracy for nothing).

Fidelity against fp32 (bounded in ``tests/passes/test_lower_precision.py``):
bf16 rounds each GEMM's inputs to 8 significant bits and accumulates in fp32,
so outputs differ from fp32 by under 2^-6 of their scale (measured <= 2^-7).
Measured in ``benchmarks/compiled_vs_eager.py --precision bf16``: trained
MiniLM's embedding cosine 0.99996; the random-weight Llama's (vocab 32000,
prefill 128) top token agrees at 96-98% of positions: the others are near
ties in fp32 (top-two margin under twice the max |diff|), where bf16's
rounding decides; the zoo's small Llama agrees at every position.

Run on the float graph after the cleanup, analysis and quantize stages and
before placement; ``CompileOptions`` refuses ``precision="bf16"`` together with
``int8`` or ``quantization``.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.fx as fx

from ..ir import Graph
from ..ir.rewrite import insert_node
from .base import Pass, PassContext, PassResult, register_pass

log = logging.getLogger("kiln")

aten = torch.ops.aten
PRECISIONS = ("fp32", "bf16")
TO_COPY = aten._to_copy.default
SDPA = aten.scaled_dot_product_attention.default
# name -> op; each node's floating-point tensor arguments all go to bf16
GEMM_OPS = {
    "linear": aten.linear.default, "matmul": aten.matmul.default, "mm": aten.mm.default,
    "bmm": aten.bmm.default, "addmm": aten.addmm.default, "conv2d": aten.conv2d.default,
}
# ops that move or copy values without computing on them: the same values in bf16 as in fp32
LAYOUT_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int,
              aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default,
              aten.alias.default, aten.expand.default, aten.contiguous.default}
CAST_KEY = "kiln_lower_precision"  # on the casts this pass adds: "to_bf16" | "to_fp32"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def bf16_units() -> tuple[bool, str]:
    """Whether this machine runs bf16 GEMMs natively (True, the units) or not (False, why not)."""
    flags = _cpu_flags()
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if not units:
        return False, "the CPU has neither amx_bf16 nor avx512_bf16 (bf16 GEMMs would be emulated)"
    if not torch.backends.mkldnn.is_available():
        return False, "PyTorch is built without oneDNN (mkldnn), which runs its bf16 GEMMs"
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if supported is not None and not supported():
        return False, "PyTorch's oneDNN reports no bf16 support on this CPU"
    return True, " ".join(units)


def _is_fp32(value) -> bool:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def _is_float(value) -> bool:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


@register_pass
class LowerPrecision(Pass):
    name = "lower_precision"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        precision = getattr(ctx.options, "precision", "fp32")
        if precision == "fp32":
            return PassResult(False, {"precision": "fp32"})
        ok, why = bf16_units()
        if not ok:
            log.warning("kiln: precision=%r requested, but %s: compiling in fp32", precision, why)
            return PassResult(False, {"precision": "fp32", "requested": precision, "bf16_units": False,
                                      "reason": why})
        rewriter = _Rewriter(graph)
        counts = {name: 0 for name in (*GEMM_OPS, "sdpa")}
        skipped = []
        by_target = {op: name for name, op in GEMM_OPS.items()} | {SDPA: "sdpa"}
        for node in graph.compute_nodes():
            kind = by_target.get(node.target)
            if kind is None:
                continue
            floats = [a for a in (*node.args, *node.kwargs.values()) if _is_float(a)]
            if not floats or not all(_is_fp32(a) for a in floats) or not _is_fp32(node):
                skipped.append(f"{node.name} (not all fp32)")
                continue
            rewriter.lower(node)
            counts[kind] += 1
        dropped = rewriter.drop_unused_weights()
        stats = {"precision": precision, "bf16_units": True, "units": why,
                 **{k: v for k, v in counts.items() if v}, "bf16_weights": len(rewriter.weights),
                 "fp32_weights_dropped": dropped, "casts_to_bf16": rewriter.casts["to_bf16"],
                 "casts_to_fp32": rewriter.casts["to_fp32"], "kept_bf16_between": rewriter.kept,
                 **({"left_fp32": skipped} if skipped else {})}
        return PassResult(sum(counts.values()) > 0, stats)


class _Rewriter:
    """The rewrite of one graph: bf16 weights and input casts shared between the nodes that read them."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.weights: dict[str, fx.Node] = {}  # fp32 weight name -> its bf16 weight node
        self.bf16_of: dict[fx.Node, fx.Node] = {}  # fp32 value -> the bf16 node holding the same values
        self.originals: list[fx.Node] = []  # fp32 weights converted
        self.casts = {"to_bf16": 0, "to_fp32": 0}
        self.kept = 0  # inputs read in bf16 straight from another lowered node (two casts fewer)

    def lower(self, node: fx.Node) -> None:
        mask_index = 3 if node.target is SDPA else None

        def convert(i, value):
            if not _is_fp32(value):
                return value
            return self.to_bf16(value, node, clamp=i == mask_index or i == "attn_mask")

        node.args = tuple(convert(i, a) for i, a in enumerate(node.args))
        node.kwargs = {k: convert(k, v) for k, v in node.kwargs.items()}
        node.meta["val"] = node.meta["val"].to(torch.bfloat16)
        users = list(node.users)
        back = insert_node(self.graph.fx, TO_COPY, (node,), {"dtype": torch.float32}, origin=node,
                           before=node.next, val=node.meta["val"].to(torch.float32))
        back.meta[CAST_KEY] = "to_fp32"
        self.casts["to_fp32"] += 1
        for user in users:
            user.replace_input_with(node, back)
        self.bf16_of[back] = node

    def to_bf16(self, value: fx.Node, reader: fx.Node, clamp: bool) -> fx.Node:
        if value in self.bf16_of:
            return self.bf16_of[value]
        if self.graph.is_weight(value):
            return self._weight(value)
        if not clamp:
            kept = self._through_layout(value)
            if kept is not None:
                self.kept += 1
                return kept
        src = value
        if clamp:  # fp32's finite extremes would round to +-inf in bf16
            lim = torch.finfo(torch.bfloat16).max
            src = insert_node(self.graph.fx, aten.clamp.default, (value, -lim, lim), origin=reader,
                              val=value.meta["val"])
        cast = insert_node(self.graph.fx, TO_COPY, (src,), {"dtype": torch.bfloat16}, origin=reader,
                           val=value.meta["val"].to(torch.bfloat16))
        cast.meta[CAST_KEY] = "to_bf16"
        self.casts["to_bf16"] += 1
        if not clamp:
            self.bf16_of[value] = cast
        return cast

    def _through_layout(self, value: fx.Node) -> fx.Node | None:
        """``value`` rebuilt on bf16 when it is layout ops over a cast back from a lowered node's bf16 result."""
        chain, v = [], value
        while v not in self.bf16_of:
            if not (isinstance(v, fx.Node) and v.op == "call_function" and v.target in LAYOUT_OPS
                    and isinstance(v.args[0], fx.Node) and _is_fp32(v.args[0])
                    and not any(_is_float(a) for a in (*v.args[1:], *v.kwargs.values()))):
                return None
            chain.append(v)
            v = v.args[0]
        current = self.bf16_of[v]
        for op in reversed(chain):
            if op in self.bf16_of:
                current = self.bf16_of[op]
                continue
            # right after the fp32 op, so every input (its shape arguments included) is defined before it
            new = insert_node(self.graph.fx, op.target, (current, *op.args[1:]), op.kwargs, origin=op,
                              before=op.next, val=op.meta["val"].to(torch.bfloat16))
            self.bf16_of[op] = new
            current = new
        return current

    def _weight(self, node: fx.Node) -> fx.Node:
        if node.name not in self.weights:
            source = self.graph.weight_sources.get(node.name)
            with self.graph.fx.inserting_before(node):
                self.weights[node.name] = self.graph.add_weight(
                    f"{node.name}_bf16", self.graph.weights[node.name].to(torch.bfloat16),
                    source and f"{source}:bf16")
            self.originals.append(node)
        return self.weights[node.name]

    def drop_unused_weights(self) -> int:
        dropped = 0
        for node in self.originals:
            if not node.users:
                self.graph.remove_weight(node)
                dropped += 1
        return dropped
