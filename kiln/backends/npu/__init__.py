"""The ``npu`` backend: a mobile NPU's compile-time constraints, executed emulated on this CPU, priced by a cost model.

What a Qualcomm HTP (through QNN) enforces is enforced here at placement
time (``ops.py``): static shapes only, and a small op set, ``kiln::int8_linear``
(int8 weights x int8 per-tensor static activations, int32 accumulation) and
the reshapes next to it. Every other node is refused with a reason
(:meth:`NpuBackend.refusal`), and the ``npu`` target (backends ``npu``,
``cpu``, ``torch``) runs it on the CPU; the ``place`` pass counts the
reasons (``refused_by_npu``) and keeps them per node for ``kiln inspect``.
Nodes placed here run on queue ``npu0`` (unless a pass chose a queue), so
the executor runs them on their own worker beside ``cpu0``.

A partition lowers to the ``npu-emulated`` kernel format
(``kiln/runtime/kernels/npu_emulated.py``): its JSON graph, its static input
types, the graph's digest and the *modeled* time per call and per graph
build. The runtime runs it with the ops' own CPU kernels (bit-exact integer
arithmetic), checks every call's shapes against the static ones, and counts
graph builds per (digest, shapes) in ``kiln.runtime.npu``.

``cost.py`` is the cost model (sourced parameters, :class:`NpuCost`);
:meth:`NpuBackend.cost` gives placement a node's modeled microseconds on the
NPU, and ``cost.modeled_us(partition_or_graph, "npu" | "cpu")`` prices whole
partitions for a scheduler. Every NPU time is modeled, and says so.

Options: ``CompileOptions(backend_options={"npu": NpuOptions(cost=NpuCost(handoff_us=50))})``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ...errors import KilnError, UnsupportedOpError
from ...ir.meta import dtype_name
from ...ir.serialize import graph_to_json, target_name
from ...runtime.kernels.npu_emulated import FORMAT, graph_digest
from ..base import Backend, LoweredPartition, Partition, register_backend
from .cost import NpuCost, build_us, handoff_us, modeled_us, node_us
from .ops import INT8_LINEAR, refusal


@dataclass
class NpuOptions:
    """The ``npu`` backend's options: the cost model's parameters (``cost.NpuCost``, each overridable)."""

    cost: NpuCost = field(default_factory=NpuCost)

    def __post_init__(self):
        if not isinstance(self.cost, NpuCost):
            raise KilnError(f"NpuOptions.cost must be a kiln.backends.npu.NpuCost, not {type(self.cost).__name__}")


@register_backend
class NpuBackend(Backend):
    name = "npu"
    options_type = NpuOptions
    options: NpuOptions
    default_queue = "npu0"

    def refusal(self, node: fx.Node) -> str | None:
        return refusal(node)

    def supports(self, node: fx.Node) -> bool:
        return refusal(node) is None

    def cost(self, node: fx.Node) -> float:
        """Modeled microseconds of ``node`` on the NPU (the cost model's, not a measurement)."""
        return node_us(node, "npu", self.options.cost)

    def modeled_task_us(self, partition: Partition) -> float:
        """Modeled microseconds of ``partition`` on its device: the NPU for npu partitions, the phone's CPU else."""
        return modeled_us(partition, "npu" if partition.backend == self.name else "cpu", self.options.cost)

    def modeled_handoff_us(self) -> float:
        """The cost model's synchronisation per hand-off between the NPU and CPU queues (modeled)."""
        return self.options.cost.handoff_us

    def lower(self, partition: Partition) -> LoweredPartition:
        nodes = [n for n in partition.gm.graph.nodes if n.op == "call_function"]
        for n in nodes:  # placement checked these; a partition built by hand may not have been
            why = refusal(n)
            if why is not None:
                raise UnsupportedOpError(f"node {n.name}: the npu backend cannot lower it: {why}", n.name)
        placeholders = [n for n in partition.gm.graph.nodes if n.op == "placeholder"][:len(partition.inputs)]
        inputs = []
        for name, ph in zip(partition.inputs, placeholders):
            val = ph.meta.get("val")
            if val is None or not all(isinstance(d, int) for d in val.shape):
                raise UnsupportedOpError(f"npu partition {partition.name}: input {name} has no static shape "
                                         f"({None if val is None else list(val.shape)})", None)
            inputs.append({"name": name, "shape": list(val.shape), "dtype": dtype_name(val.dtype)})
        graph = graph_to_json(partition.gm)
        c = self.options.cost
        execute = modeled_us(partition, "npu", c)
        build = build_us(partition, c)
        matmuls = sum(1 for n in nodes if n.target is INT8_LINEAR)
        return LoweredPartition(
            format=FORMAT,
            spec={"graph": graph, "inputs": inputs, "digest": graph_digest(graph),
                  "modeled": {"execute_us": round(execute, 3), "build_us": round(build, 3)}},
            report={"kernels": "npu (emulated: exact int8 arithmetic on this CPU)",
                    "ops": sorted({target_name(n.target) for n in nodes}),
                    "int8 matmuls": matmuls,
                    "static inputs": [f"{i['name']}: {i['dtype']}{i['shape']}" for i in inputs],
                    "modeled execute (us per call)": round(execute, 3),
                    "modeled graph build (us)": round(build, 3)},
        )


__all__ = ["NpuBackend", "NpuCost", "NpuOptions", "build_us", "handoff_us", "modeled_us", "node_us", "refusal"]
