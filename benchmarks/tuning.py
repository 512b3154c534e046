"""MetaSchedule tuning (``CpuOptions.tune_trials``) vs kiln's schedule rules, on the TIR kernels of a decoder layer.

    .venv/bin/python benchmarks/tuning.py [--trials 64] [--rounds 50]

GEMMs and attention run as PyTorch kernels in the cpu backend, so tuning only
reaches what stays in TIR. This model is exactly that part of a llama layer at
the Llama sizes of ``benchmarks/compiled_vs_eager.py`` (hidden 512, 128 tokens, 8 heads):
residual add + RMS norm, silu(gate) * up, and a softmax over attention scores.
It is compiled twice — kiln's rules, then ``tune_trials=N`` — and the two
are timed interleaved (median per call). Eager is left out: on 2 shared cores its
OpenMP threads swing from 1.7 ms to 60 ms with the neighbours' load. Tuning time is
printed too; a second compile that reuses the tuned artifact shows reuse cost.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kiln  # noqa: E402
from kiln.backends.cpu import CpuOptions  # noqa: E402
from kiln.timing import median_ms  # noqa: E402
from kiln.timing import machine  # noqa: E402


class DecoderTir(nn.Module):
    """The non-GEMM work of one llama decoder layer."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)

    def forward(self, x, residual, gate, up, scores):
        h = x + residual
        y = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        return y, h, nn.functional.silu(gate) * up, scores.softmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokens, hidden, heads = 128, 512, 8
    model = DecoderTir(hidden).eval()
    inputs = (torch.randn(tokens, hidden), torch.randn(tokens, hidden), torch.randn(tokens, 4 * hidden),
              torch.randn(tokens, 4 * hidden), torch.randn(heads, tokens, tokens))

    start = time.perf_counter()
    rules = kiln.compile(model, inputs)
    rules_s = time.perf_counter() - start
    start = time.perf_counter()
    tuned = kiln.compile(model, inputs, options=kiln.CompileOptions(backend_options={"cpu": CpuOptions(tune_trials=args.trials)}))
    tuned_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        tuned.save(Path(tmp) / "a")
        start = time.perf_counter()
        reuse = kiln.CompileOptions(backend_options={"cpu": CpuOptions(tuning_database=str(Path(tmp) / "a"))})
        kiln.compile(model, inputs, options=reuse)
        reuse_s = time.perf_counter() - start

    with torch.no_grad():
        want = model(*inputs)
    for got in (rules(*inputs), tuned(*inputs)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)

    report = tuned.manifest["partitions"][0]["report"]
    tuning = report["tuning"]
    print(f"machine: {machine()}")
    print(f"tuning: {', '.join(f'{k} {v}' for k, v in tuning.items() if isinstance(v, int))}")
    print("kernel (us measured while tuning: kiln's rule / best MetaSchedule candidate) -> schedule applied")
    for kernel in report["kernels"]:
        us = tuning["kernel_us"].get(kernel["name"], {})
        print(f"  {kernel['name'][:60]:<60} {us.get('rule')} / {us.get('meta_schedule')} -> {kernel['schedule']}")
    print(f"compile s: rules {rules_s:.1f}, tune_trials={args.trials} {tuned_s:.1f}, reuse of that database "
          f"{reuse_s:.1f}")
    ms = median_ms({"kiln rules": lambda: rules(*inputs), "kiln tuned": lambda: tuned(*inputs)},
                   repeat=args.rounds, warmup=5)
    print("median ms per call: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    print(f"rules/tuned {ms['kiln rules'] / ms['kiln tuned']:.2f}")


if __name__ == "__main__":
    main()
