"""The NPU cost model: modeled device time of int8 matmuls on the NPU, float work on the CPU side, graph builds, hand-offs.

Every number this module returns is *modeled* (microseconds of a phone this
machine is not), never measured; whoever prints one says so. The parameters
are one dataclass, :class:`NpuCost`, overridable through
``CompileOptions(backend_options={"npu": NpuOptions(cost=NpuCost(...))})``;
its docstring says where each default comes from, and which are assumed.

What is priced:

- an int8 matmul on the NPU (``kiln::int8_linear``): the larger of its
  compute time (``2·M·K·N`` ops at the sustained int8 rate) and its memory
  time (activations in, int8 weights and scales, float result out, at the
  DRAM bandwidth): a roofline;
- work on the CPU side, where float ops (and int8 linears placed there) run:
  matmul-class ops at the CPU's float (or int8) rate, everything else as
  one op per output element, each against its bytes at the same DRAM
  bandwidth; reshape/view-like ops are free;
- a graph build per distinct static graph (per int8 matmul it holds);
- a hand-off between queues (``npu0`` <-> ``cpu0``): a fixed
  synchronisation cost plus the tensor's bytes through DRAM.

:func:`modeled_us` prices a whole partition or graph on ``"npu"`` or
``"cpu"``; :func:`node_us` one node; :func:`build_us` a graph's build;
:func:`handoff_us` one edge between queues. A list scheduler adds the
hand-offs on the edges its order puts across queues.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.fx as fx

from ...errors import KilnError, UnsupportedOpError
from ...ir.printer import op_name
from .ops import INT8_LINEAR, is_shape_op, refusal

DEVICES = ("npu", "cpu")


@dataclass(frozen=True)
class NpuCost:
    """The cost model's parameters. Defaults model a Snapdragon 8 Gen 3 phone (the mllm-NPU paper's class of device).

    Sources (S: sourced, D: derived from sourced numbers, A: assumed):

    - ``npu_int8_tops = 45`` (S): the Hexagon NPU of the Snapdragon 8 Gen 3
      is rated at 45 INT8 TOPS (third-party spec summaries, e.g.
      runlocalai.co/hardware/snapdragon-8-gen-3; Qualcomm itself publishes
      relative gains, "98% faster AI", not a TOPS figure for this part).
    - ``npu_efficiency = 0.25`` (A): the fraction of the peak a w8a8 matmul of
      LLM shape sustains through QNN. Not sourced: peak ratings assume ideal
      tiling; mllm-NPU (Xu et al., "Fast On-device LLM Inference with NPUs",
      ASPLOS 2025) reports its NPU int8 matmul 4.6x faster than the CPU's
      int8 and 1.9x the GPU's fp16 (0.9 vs 4.2 vs 1.7 ms in its
      microbenchmark), and fp16 on the NPU 280x slower (252 ms): why float
      work is refused, not priced, on the NPU.
    - ``dram_gbps = 76.8`` (D): LPDDR5X at 4800 MHz (the 8 Gen 3's supported
      memory, Qualcomm's spec sheet as reported by e.g. droidholic.com,
      fyss.in) on a 64-bit bus: 4800e6 x 2 x 8 bytes = 76.8 GB/s, shared by
      the CPU and the NPU.
    - ``cpu_fp32_gflops = 100`` (A): the sustained fp32 GEMM rate of the CPU
      side (prefill's float work: attention, norms, outlier matmuls). Derived
      loosely from the Cortex-X4 at 3.3 GHz (four 128-bit FMA pipes: 32
      FLOP/cycle, about 105 GFLOPS peak for that one core); not measured.
    - ``cpu_int8_gops = 400`` (A): int8 GEMM on the CPU (SDOT/I8MM process
      four times the lanes of fp32): 4x ``cpu_fp32_gflops``, assumed.
    - ``graph_build_us_per_matmul = 94_400`` (D): mllm-NPU reports, for
      Gemma-2B, about 360 ms to build the QNN graph and 11.54 s to optimize
      it (as summarized in the ASPLOS 2025 talk slides); spread over its 18
      layers x 7 linears = 126 matmuls: (0.36 + 11.54) s / 126 = 94.4 ms per
      matmul. Assumed: build time proportional to the matmuls in a graph.
    - ``handoff_us = 100`` (A): synchronisation per task hand-off between the
      CPU and NPU queues. The Hexagon SDK's system-optimization guide says
      the CPU-DSP buffer cache maintenance takes "a minimum of a few hundred
      microseconds" without hardware IO-coherence and that an invocation can
      cost several milliseconds with CPU sleep modes; the 8 Gen 3's
      IO-coherent path is assumed to sit below that, at 100 us.

    A cross-check of the defaults against the paper's headline: Qwen1.5-1.8B
    (24 layers, hidden 2048, FFN 5504) holds 1.21e9 linear weights, 2.43e9
    int8 ops per token: at 45 x 0.25 TOPS, 216 us per token, and a 256-token
    chunk (55 ms) is compute-bound (its 1.21 GB of weights take 15.8 ms at
    76.8 GB/s). The linears alone then prefill about 4,600 tokens/s on the
    modeled NPU, above mllm-NPU's reported >1,000 tokens/s for the whole
    model (attention, norms and outliers on the CPU, hand-offs): the same
    order, no contradiction, and no validation either.
    """

    npu_int8_tops: float = 45.0
    npu_efficiency: float = 0.25
    dram_gbps: float = 76.8
    cpu_fp32_gflops: float = 100.0
    cpu_int8_gops: float = 400.0
    graph_build_us_per_matmul: float = 94_400.0
    handoff_us: float = 100.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and f.name not in ("handoff_us", "graph_build_us_per_matmul")):
                raise KilnError(f"NpuCost.{f.name} must be a finite number > 0"
                                + (" (or 0)" if f.name in ("handoff_us", "graph_build_us_per_matmul") else "")
                                + f", not {value!r}")
        if self.npu_efficiency > 1:
            raise KilnError(f"NpuCost.npu_efficiency is a fraction of the peak, at most 1, not {self.npu_efficiency}")

    # ---- the formulas, in microseconds --------------------------------------------------------------------------

    def memory_us(self, nbytes: float) -> float:
        return nbytes / (self.dram_gbps * 1e3)  # GB/s = 1e3 bytes per microsecond

    def npu_int8_matmul_us(self, m: int, k: int, n: int, nbytes: float) -> float:
        """``[m, k] x [k, n]`` on the NPU moving ``nbytes``: max(compute at the sustained int8 rate, memory)."""
        compute = 2 * m * k * n / (self.npu_int8_tops * self.npu_efficiency * 1e6)  # TOPS = 1e6 ops per us
        return max(compute, self.memory_us(nbytes))

    def cpu_us(self, ops: float, nbytes: float, *, int8: bool = False) -> float:
        """``ops`` (flops, or int8 ops) on the CPU moving ``nbytes``: max(compute, memory)."""
        rate = self.cpu_int8_gops if int8 else self.cpu_fp32_gflops
        return max(ops / (rate * 1e3), self.memory_us(nbytes))  # GFLOPS = 1e3 flops per us

    def build_us(self, matmuls: int) -> float:
        """One graph build (QNN build + finalize) of a static graph holding ``matmuls`` int8 matmuls."""
        return self.graph_build_us_per_matmul * max(matmuls, 1)

    def handoff_us_for(self, nbytes: float) -> float:
        """One hand-off between queues of a tensor of ``nbytes``: synchronisation plus one trip through DRAM."""
        return self.handoff_us + self.memory_us(nbytes)


# ---- pricing fx nodes --------------------------------------------------------------------------------------------

_MATMULS = {"aten.linear", "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul", "aten.addbmm"}
_ATTENTION = {"aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
              "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention"}
_FREE = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.unsqueeze", "aten.squeeze", "aten.expand",
         "aten.permute", "aten.transpose", "aten.t", "aten.slice", "aten.select", "aten.alias", "aten.detach",
         "aten.flatten", "aten.unflatten", "aten.split", "aten.chunk"}  # by base name, any overload


def _size(d) -> int:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        hint = d.node.hint
        if hint is not None:
            return int(hint)
    raise KilnError(f"cannot price a tensor with the unbounded dimension {d}")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _numel(t: torch.Tensor) -> int:
    return math.prod(_size(d) for d in t.shape)


def _bytes(t: torch.Tensor) -> int:
    return _numel(t) * t.element_size()


def _node_bytes(node: fx.Node) -> int:
    """Bytes read and written: every tensor input once, every output once."""
    ins = [t for n in node.all_input_nodes for t in _tensors(n.meta.get("val"))]
    return sum(_bytes(t) for t in ins + _tensors(node.meta.get("val")))


def _int8_linear_dims(node: fx.Node) -> tuple[int, int, int]:
    x, weight = node.args[0].meta["val"], node.args[1].meta["val"]
    n, k = (_size(d) for d in weight.shape)
    return _numel(x) // max(k, 1), k, n


def _base(node: fx.Node) -> str:
    name = op_name(node.target)
    return name.rsplit(".", 1)[0] if name.count(".") >= 2 else name


def _float_flops(node: fx.Node) -> float:
    """Flops of a float op on the CPU: 2·out·K for matmul-class ops, attention's two matmuls, else one per element."""
    base = _base(node)
    out = _tensors(node.meta.get("val"))
    out_elems = sum(_numel(t) for t in out)
    if base in _MATMULS:
        # K is the last dim of the first matrix operand (linear/mm/bmm/matmul: the input; addmm: args[1])
        operand = node.args[1] if base in ("aten.addmm", "aten.baddbmm", "aten.addbmm") else node.args[0]
        val = operand.meta.get("val") if isinstance(operand, fx.Node) else None
        k = _size(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else 1
        return 2.0 * out_elems * k
    if base in _ATTENTION:
        q, key = node.args[0].meta["val"], node.args[1].meta["val"]
        lq, d = _size(q.shape[-2]), _size(q.shape[-1])
        heads = _numel(q) // max(lq * d, 1)
        return 4.0 * heads * lq * _size(key.shape[-2]) * d
    return float(out_elems)


def node_us(node: fx.Node, device: str, cost: NpuCost | None = None) -> float:
    """Modeled microseconds of ``node`` (a call_function node with types) on ``device`` ("npu" or "cpu").

    On "npu" a node the NPU refuses raises UnsupportedOpError with the reason.
    """
    cost = cost or NpuCost()
    if device not in DEVICES:
        raise KilnError(f"unknown device {device!r} for the NPU cost model (known: {', '.join(DEVICES)})")
    if node.op != "call_function":
        return 0.0
    if device == "npu":
        why = refusal(node)
        if why is not None:
            raise UnsupportedOpError(f"node {node.name}: the NPU cannot run it: {why}", node.name)
        if is_shape_op(node):
            return 0.0
        m, k, n = _int8_linear_dims(node)
        return cost.npu_int8_matmul_us(m, k, n, _node_bytes(node))
    if node.target is INT8_LINEAR:
        m, k, n = _int8_linear_dims(node)
        return cost.cpu_us(2.0 * m * k * n, _node_bytes(node), int8=True)
    base = _base(node)
    if base in _FREE or not _tensors(node.meta.get("val")):
        return 0.0
    return cost.cpu_us(_float_flops(node), _node_bytes(node))


def _nodes(partition_or_graph) -> list[fx.Node]:
    target = partition_or_graph
    if hasattr(target, "gm") and isinstance(target.gm, fx.GraphModule):  # a kiln.backends.Partition
        target = target.gm
    if isinstance(target, fx.GraphModule):
        target = target.graph
    fx_graph = getattr(target, "fx", None)  # a kiln.ir.Graph
    if isinstance(fx_graph, fx.Graph):
        target = fx_graph
    if isinstance(target, fx.Graph):
        return [n for n in target.nodes if n.op == "call_function"]
    try:
        nodes = list(target)
    except TypeError:
        raise KilnError(f"modeled_us prices a Partition, an fx.GraphModule/Graph, a kiln Graph or a list of fx "
                        f"nodes, not {type(partition_or_graph).__name__}") from None
    if not all(isinstance(n, fx.Node) for n in nodes):
        raise KilnError("modeled_us: a list to price must hold fx nodes only")
    return [n for n in nodes if n.op == "call_function"]


def modeled_us(partition_or_graph, device: str, cost: NpuCost | None = None) -> float:
    """Modeled microseconds of one run of every compute node of ``partition_or_graph`` on ``device``, in sequence.

    Hand-offs between queues and graph builds are not included (see
    :func:`handoff_us`, :func:`build_us`). On "npu", a node the NPU refuses
    raises UnsupportedOpError naming it and why.
    """
    return sum(node_us(n, device, cost) for n in _nodes(partition_or_graph))


def build_us(partition_or_graph, cost: NpuCost | None = None) -> float:
    """Modeled microseconds of building ``partition_or_graph`` as one static NPU graph."""
    cost = cost or NpuCost()
    return cost.build_us(sum(1 for n in _nodes(partition_or_graph) if n.target is INT8_LINEAR))


def handoff_us(value, cost: NpuCost | None = None) -> float:
    """Modeled microseconds of handing ``value`` (an fx node with a ``val``, a tensor, or a byte count) between queues."""
    cost = cost or NpuCost()
    if isinstance(value, fx.Node):
        nbytes = sum(_bytes(t) for t in _tensors(value.meta.get("val")))
    elif isinstance(value, torch.Tensor):
        nbytes = _bytes(value)
    else:
        nbytes = value
    return cost.handoff_us_for(nbytes)
