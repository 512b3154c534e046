"""The GEMM kernels kiln's cpu target chooses between, timed per shape on this machine.

For the GEMM shapes of the compiled_vs_eager workloads: microseconds per call
of MKL as eager calls it, MKL in 1024-column blocks (bitwise the same result),
MKL on the weight packed once for the call's row count (``mkl_packed``: linears
on a model's weights), oneDNN, and oneDNN on the weight packed once into its blocked layout
(``onednn_packed``), each through the runtime function the compiled library calls
(``kiln/runtime/kernels/tvm_dispatch.py``), interleaved rounds, medians; the
ratio is MKL's time over the kernel's (> 1: faster than eager's kernel), and
"chosen" is what ``select_gemm`` would pick from these times
(``kiln/backends/cpu/gemm.py``: >= 5% faster to replace the kernel before it, 2% for the packed ones).

    .venv/bin/python benchmarks/gemm_kernels.py [--budget 0.5]
"""
from __future__ import annotations

import argparse
import os

import torch
from rich.console import Console
from rich.table import Table

from kiln.backends.cpu import gemm
from kiln import timing  # noqa: E402

# workload -> (rule, m, k, n) of its GEMMs (the zoo models of benchmarks/compiled_vs_eager.py)
SHAPES = {
    "llama prefill 128": [("linear", 128, 512, n) for n in (512, 256, 2048)] + [("linear", 128, 2048, 512),
                                                                               ("linear", 128, 512, 32000)],
    "llama decode": [("linear", 1, 512, n) for n in (512, 256, 2048)] + [("linear", 1, 2048, 512),
                                                                        ("linear", 1, 512, 32000)],
    "gpt2 128": [("addmm", 128, 768, n) for n in (2304, 768, 3072)] + [("addmm", 128, 3072, 768),
                                                                      ("linear", 128, 768, 50257)],
    "vit 197": [("linear_bias", 197, 768, 768), ("linear_bias", 197, 768, 3072), ("linear_bias", 197, 3072, 768)],
    "bert 128": [("linear_bias", 128, 768, 768), ("linear_bias", 128, 768, 3072), ("linear_bias", 128, 3072, 768)],
    "minilm 128": [("linear_bias", 128, 384, 384), ("linear_bias", 128, 384, 1536),
                   ("linear_bias", 128, 1536, 384)],
}
KERNELS = ("mkl", "mkl_cols", "mkl_packed", "onednn", "onednn_packed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of measuring per kernel and shape")
    args = parser.parse_args()
    console = Console(width=190)
    console.print(f"machine: {timing.machine()}")
    console.print(f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
                  f"median us per call, ~{args.budget} s per kernel and shape; load average {os.getloadavg()[0]:.2f}")
    table = Table()
    columns = ["workload", "GEMM", *(f"{k} us" for k in KERNELS), *(f"mkl/{k}" for k in KERNELS[1:]), "chosen"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("workload", "GEMM", "chosen") else "right")
    for workload, shapes in SHAPES.items():
        for rule, m, k, n in shapes:
            shape = gemm.GemmShape(rule, m, k, n, "f32", constant_weight=True)  # a model's weight: packable
            us = gemm.measure(shape, gemm.candidates(shape, "measure"), budget_s=args.budget, max_rounds=200)
            table.add_row(workload, shape.label(), *(f"{us[k]:.0f}" if k in us else "-" for k in KERNELS),
                          *(f"{us['mkl'] / us[k]:.2f}" if k in us else "-" for k in KERNELS[1:]), gemm.choose(us))
    console.print(table)
    console.print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
