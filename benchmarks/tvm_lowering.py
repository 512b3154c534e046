"""kiln's TVM CPU lowering vs PyTorch eager vs torch.compile (inductor), whole model as one partition.

    .venv/bin/python benchmarks/tvm_lowering.py [--models llama,gpt2] [--rounds 20] [--no-inductor]

Each model is exported (``torch.export`` + ``run_decompositions({})``), lowered
with ``lower_partition`` and loaded through ``TvmVmKernel`` from the library
bytes. The runners are timed interleaved (one call of each per round, so a
busy neighbour slows all of them alike) after warm-up; the table shows the
median per runner and the ratios eager/kiln and inductor/kiln (> 1: kiln is
faster). Other work on the machine makes absolute times noisy: quote ratios
from a quiet run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from torch.export.graph_signature import InputKind  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kiln import zoo  # noqa: E402
from kiln.backends.tvm import lower_partition  # noqa: E402
from kiln.runtime.kernels.tvm_vm import TvmVmKernel  # noqa: E402

# Benchmark sizes: a 512-wide, 4-layer model on a 128-token prompt (ViT: 196 patches).
CONFIGS = {
    "llama": lambda: zoo.llama(hidden=512, layers=4, heads=8, kv_heads=4, seq=128),
    "qwen2": lambda: zoo.qwen2(hidden=512, layers=4, heads=8, kv_heads=4, seq=128),
    "gpt2": lambda: zoo.gpt2(hidden=512, layers=4, heads=8, seq=128),
    "bert": lambda: zoo.bert(hidden=512, layers=4, heads=8, seq=128, batch=1),
    "vit": lambda: zoo.vit(hidden=512, layers=4, heads=8, image=224, patch=16),
    "minilm": lambda: zoo.minilm(seq=128, batch=1),
}


def export_partition(model, args) -> tuple[fx.GraphModule, int, dict[str, torch.Tensor]]:
    """The whole model as one partition: placeholders are the inputs, then the weights by name."""
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # a whole-prompt forward, no KV cache output
    ep = torch.export.export(model, args).run_decompositions({})
    old = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs, weights = [], {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(spec.arg.name)
        else:
            value = ep.state_dict.get(spec.target)
            weights[spec.arg.name] = (value if value is not None else ep.constants[spec.target]).detach()
    graph, env = fx.Graph(), {}
    for name in inputs + list(weights):
        env[old[name]] = graph.placeholder(name)
        env[old[name]].meta = dict(old[name].meta)
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(torch.nn.Module(), graph), len(inputs), weights


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        return first_tensor(out[0])
    return first_tensor(next(iter(out.values())))


def bench(name: str, rounds: int, warmup: int, inductor: bool, tmp: str) -> dict:
    model, args = CONFIGS[name]()
    gm, num_inputs, weights = export_partition(model, args)
    start = time.perf_counter()
    lowered = lower_partition(gm, num_inputs, weights)
    compile_s = time.perf_counter() - start
    path = os.path.join(tmp, f"{name}.so")
    with open(path, "wb") as f:
        f.write(lowered.library)
    kernel = TvmVmKernel(lowered.spec, path, weights)
    inputs = list(args)
    runners = {"eager": lambda: model(*args), "kiln": lambda: kernel(inputs)}
    inductor_s = None
    if inductor:
        compiled = torch.compile(model, backend="inductor")
        start = time.perf_counter()
        with torch.no_grad():
            compiled(*args)
        inductor_s = time.perf_counter() - start
        runners["inductor"] = lambda: compiled(*args)
    times = {k: [] for k in runners}
    with torch.no_grad():
        diff = (kernel(inputs)[0] - first_tensor(model(*args))).abs().max().item()
        for _ in range(warmup):
            for run in runners.values():
                run()
        for _ in range(rounds):
            for key, run in runners.items():
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"model": name, "ms": med, "compile_s": compile_s, "inductor_s": inductor_s, "max_abs_diff": diff,
            "dispatched": sum(lowered.spec["report"]["dispatched"].values()),
            "tir_kernels": len(lowered.spec["report"]["kernels"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile (slow to compile here)")
    opts = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {opts.rounds} interleaved "
          f"rounds after {opts.warmup} warm-up; ratio > 1: kiln is faster")
    header = f"{'model':8} {'eager ms':>9} {'kiln ms':>8} {'eager/kiln':>10}"
    if not opts.no_inductor:
        header += f" {'inductor ms':>11} {'ind/kiln':>8}"
    header += f" {'compile s':>9} {'dispatch':>8} {'TIR':>4} {'max|diff|':>9}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.models.split(","):
            r = bench(name, opts.rounds, opts.warmup, not opts.no_inductor, tmp)
            ms = r["ms"]
            line = f"{name:8} {ms['eager']:9.2f} {ms['kiln']:8.2f} {ms['eager'] / ms['kiln']:10.2f}"
            if "inductor" in ms:
                line += f" {ms['inductor']:11.2f} {ms['inductor'] / ms['kiln']:8.2f}"
            line += f" {r['compile_s']:9.2f} {r['dispatched']:8} {r['tir_kernels']:4} {r['max_abs_diff']:9.1e}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
