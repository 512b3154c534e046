"""The npu backend's cost model on a Qwen1.5-1.8B-shaped layer, and the emulation's own speed on this machine.

Two different kinds of number, printed apart and labeled:

1. MODELED (``kiln/backends/npu/cost.py``, the defaults of ``NpuCost``: a
   Snapdragon 8 Gen 3 class phone, parameters sourced in its docstring): for
   each linear of one Qwen1.5-1.8B decoder layer (hidden 2048, FFN 5504) and a
   prompt chunk of 32..256 rows, the int8 matmul's time on the NPU
   (roofline: int8 compute vs DRAM bytes), the same linear in fp32 on the
   CPU side, their ratio, and whether the NPU side is compute- or
   memory-bound; then the layer's graph-build time and one hand-off of the
   chunk's hidden state. These are a model's outputs, not measurements.
2. MEASURED here (wall clock, median of interleaved rounds, this CPU): the
   emulated kernel (``kiln::int8_linear``: quantize, ``torch._int_mm``,
   rescale) against ``F.linear`` in fp32 at the same shapes, with the
   ratio per round. This is what the emulation costs on this CPU; it says
   nothing about an NPU.

    .venv/bin/python benchmarks/npu_cost_model.py [--threads 2] [--repeat 10]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.fx as fx
import torch.nn.functional as F

from kiln.backends.npu import NpuCost, node_us
from kiln.timing import machine, paired_speedup, rounds_ms

HIDDEN, FFN = 2048, 5504
LINEARS = [("q/k/v/o proj", HIDDEN, HIDDEN, 4), ("gate/up proj", HIDDEN, FFN, 2), ("down proj", FFN, HIDDEN, 1)]
CHUNKS = (32, 64, 128, 256)


def _nodes(rows: int, k: int, n: int) -> tuple[fx.Node, fx.Node]:
    """An int8_linear node and the fp32 linear it replaces, with fake-tensor types (nothing is allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        vals = {"x": torch.empty(rows, k), "wq": torch.empty(n, k, dtype=torch.int8), "ws": torch.empty(n), "w": torch.empty(n, k),
                "b": torch.empty(n)}
        int8_out = torch.ops.kiln.int8_linear(vals["x"], vals["wq"], vals["ws"], vals["b"], 0.1)
        float_out = F.linear(vals["x"], vals["w"], vals["b"])
    g = fx.Graph()
    ph = {}
    for name, v in vals.items():
        ph[name] = g.placeholder(name)
        ph[name].meta["val"] = v
    lin8 = g.call_function(torch.ops.kiln.int8_linear.default, (ph["x"], ph["wq"], ph["ws"], ph["b"], 0.1))
    lin8.meta["val"] = int8_out
    lin = g.call_function(torch.ops.aten.linear.default, (ph["x"], ph["w"], ph["b"]))
    lin.meta["val"] = float_out
    return lin8, lin


def modeled(cost: NpuCost) -> None:
    print("MODELED (kiln.backends.npu.NpuCost defaults; not measured):")
    print("  " + ", ".join(f"{k}={v:g}" for k, v in vars(cost).items()))
    print(f"  {'linear':<14} {'rows':>5} {'npu int8 us':>12} {'bound':>7} {'cpu fp32 us':>12} {'cpu/npu':>8}")
    for rows in CHUNKS:
        layer_npu = layer_cpu = 0.0
        for name, k, n, count in LINEARS:
            lin8, lin = _nodes(rows, k, n)
            npu_us, cpu_us = node_us(lin8, "npu", cost), node_us(lin, "cpu", cost)
            compute = 2 * rows * k * n / (cost.npu_int8_tops * cost.npu_efficiency * 1e6)
            bound = "compute" if compute >= npu_us else "memory"
            layer_npu += count * npu_us
            layer_cpu += count * cpu_us
            print(f"  {name:<14} {rows:>5} {npu_us:>12.1f} {bound:>7} {cpu_us:>12.1f} {cpu_us / npu_us:>7.1f}x")
        print(f"  {'layer (7 lin.)':<14} {rows:>5} {layer_npu:>12.1f} {'':>7} {layer_cpu:>12.1f} "
              f"{layer_cpu / layer_npu:>7.1f}x   -> linears of 24 layers: {rows / (24 * layer_npu) * 1e6:,.0f} "
              "tokens/s modeled on the npu")
    print(f"  graph build of one layer's 7 int8 matmuls: {cost.build_us(7) / 1e3:,.1f} ms modeled "
          f"(24 layers: {cost.build_us(7 * 24) / 1e6:.1f} s per distinct static shape)")
    for rows in (32, 256):
        print(f"  hand-off of a [{rows}, {HIDDEN}] f32 hidden state between queues: "
              f"{cost.handoff_us_for(rows * HIDDEN * 4):.1f} us modeled")


def measured(repeat: int) -> None:
    load = os.getloadavg()[0]
    print(f"\nMEASURED here ({machine()}, {torch.get_num_threads()} threads, load average {load:.1f}; the "
          "emulation, not an NPU):")
    print(f"  {'linear':<14} {'rows':>5} {'fp32 F.linear ms':>17} {'int8_linear ms':>15} "
          f"{'fp32/int8 per round (q1 median q3)':>36}")
    g = torch.Generator().manual_seed(0)
    for rows in (32, 128):
        for name, k, n, _ in LINEARS:
            x = torch.randn(rows, k, generator=g)
            w = torch.randn(n, k, generator=g) * 0.02
            wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            ws, b = torch.rand(n, generator=g) * 1e-3, torch.randn(n, generator=g)
            times = rounds_ms({"fp32": lambda x=x, w=w, b=b: F.linear(x, w, b),
                               "int8": lambda x=x, wq=wq, ws=ws, b=b: torch.ops.kiln.int8_linear(x, wq, ws, b, 0.05)},
                              repeat=repeat)
            med, q1, q3 = paired_speedup(times["fp32"], times["int8"])
            fp32_ms, int8_ms = statistics.median(times["fp32"]), statistics.median(times["int8"])
            print(f"  {name:<14} {rows:>5} {fp32_ms:>17.3f} {int8_ms:>15.3f} "
                  f"{f'{q1:.2f}x {med:.2f}x {q3:.2f}x':>36}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modeled(NpuCost())
    measured(args.repeat)


if __name__ == "__main__":
    main()
