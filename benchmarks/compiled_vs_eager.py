"""kiln vs PyTorch eager (and optionally torch.compile), measured side by side in one run.

Each round runs every contender once in turn (interleaved, so machine load hits
all of them alike); the table shows medians after warm-up and eager/kiln ratios
(> 1.0 means kiln is faster). Nothing here is asserted: it prints measurements.

    .venv/bin/python benchmarks/compiled_vs_eager.py                 # all models
    .venv/bin/python benchmarks/compiled_vs_eager.py --models llama --repeat 20 --inductor
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import kiln  # noqa: E402
from kiln import zoo  # noqa: E402
from kiln.timing import median_ms  # noqa: E402

# name -> (factory, kwargs, description); sizes follow the CPU-backend issue's benchmark list.
WORKLOADS = {
    "llama": (zoo.llama, dict(hidden=512, layers=4, heads=8, kv_heads=4, vocab=32000, seq=128),
              "512 wide, 4 layers, prefill 128 tok"),
    "gpt2": (zoo.gpt2, dict(hidden=768, layers=4, heads=12, vocab=50257, seq=128), "768 wide, 4 layers, 128 tok"),
    "bert": (zoo.bert, dict(hidden=768, layers=4, heads=12, vocab=30522, seq=128, batch=1),
             "768 wide, 4 layers, 128 tok"),
    "vit": (zoo.vit, dict(hidden=768, layers=4, heads=12, image=224, patch=16), "768 wide, 4 layers, 224px"),
    "minilm": (zoo.minilm, dict(seq=128, batch=1), "trained, 128 tok"),
}


def _eager_call(model):
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", False) else {}

    def run(*inputs):
        with torch.no_grad():
            return model(*inputs, **kwargs)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--repeat", type=int, default=10, help="timed rounds per model (median reported)")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--inductor", action="store_true", help="also time torch.compile (inductor)")
    args = parser.parse_args()

    console = Console(width=120)
    console.print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"torch {torch.__version__} ({torch.get_num_threads()} threads), kiln {kiln.__version__}, "
                  f"target {args.target}, median of {args.repeat} after 3 warm-up runs")
    table = Table()
    for col in ("model", "workload", "compile s", "eager ms", "kiln ms", "kiln speed-up"):
        table.add_column(col, justify="left" if col in ("model", "workload") else "right")
    if args.inductor:
        table.add_column("inductor ms", justify="right")
        table.add_column("inductor speed-up", justify="right")
    for name in args.models.split(","):
        factory, kwargs, what = WORKLOADS[name]
        torch.manual_seed(0)
        model, inputs = factory(**kwargs)
        start = time.perf_counter()
        cm = kiln.compile(model, inputs, target=args.target)
        compile_s = time.perf_counter() - start
        contenders = {"eager": _eager_call(model), "kiln": cm}
        if args.inductor:
            contenders["inductor"] = _eager_call(torch.compile(model))
        ms = median_ms({name: functools.partial(fn, *inputs) for name, fn in contenders.items()}, args.repeat)
        row = [name, what, f"{compile_s:.1f}", f"{ms['eager']:.2f}", f"{ms['kiln']:.2f}",
               f"{ms['eager'] / ms['kiln']:.2f}x"]
        if args.inductor:
            row += [f"{ms['inductor']:.2f}", f"{ms['eager'] / ms['inductor']:.2f}x"]
        table.add_row(*row)
        console.print(f"  measured {name}")
    console.print(table)


if __name__ == "__main__":
    main()
