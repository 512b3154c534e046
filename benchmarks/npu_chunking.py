"""Chunked prefill against one static graph per prompt length: graph builds, padding and build time over a sweep.

An NPU (QNN/HTP) runs static graphs only, and building one takes seconds:
without chunking, every distinct prompt length needs its own graph. With
``compile_llm(..., chunk_size=C)`` one chunk program serves every length up
to the capacity. Over a sweep of prompt lengths from 7 to 1000 (lengths under
one chunk, exact multiples of every chunk size and one over them included)
this prints, per chunk size:

- **graphs**: the distinct static graphs the sweep ran (counted from the
  input shapes the chunk program was called with: 1), against the distinct
  lengths (one graph each without chunking), and a power-of-two bucket policy
  for reference;
- **padding** per prompt (max and mean tokens, and the share of computed rows
  that are padding): at most ``C-1`` for chunking;
- **build time**: kiln's compile time (trace, passes, TVM lowering on the
  ``cpu`` target) of the chunk program, measured, against the per-length
  programs: measured on a sample of lengths and extrapolated to all of them
  by a least-squares line in the length (labeled so), or measured for all
  with ``--all``;
- **correctness**: the largest difference of the chunked prefill's logits
  against eager transformers over the whole sweep (fp32).

The NPU backend's modeled graph-build time (its cost model) is not in this
table yet: :func:`modeled_build_us` is the hook; it sums the
``modeled.build_us`` the ``npu`` backend writes in each task's spec, and
prints "n/a" for an artifact without npu tasks (``--target cpu``). Every such
number is modeled, not measured, and printed so.

    .venv/bin/python benchmarks/npu_chunking.py            # about 2-3 minutes on 2 cores
    .venv/bin/python benchmarks/npu_chunking.py --all      # compile every per-length program too (longer)
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from kiln import zoo
from kiln.llm.compile import chunk_index, compile_program
from kiln.llm.runtime import DECODE, CompiledLLM
from kiln.runtime import CompiledModel
from kiln.runtime import npu as npu_counters
from kiln.runtime.artifact import merge_programs
from kiln.timing import machine

CAPACITY = 1024
MAX_LEN = 1000


def sweep_lengths(chunk_sizes: list[int], count: int = 44) -> list[int]:
    """``count`` lengths spread over 7..1000, plus every chunk size, its multiples up to 3x and one over each."""
    spread = {int(round(x)) for x in np.geomspace(7, MAX_LEN, count)}
    extra = {m * c + d for c in chunk_sizes for m in (1, 2, 3) for d in (0, 1) if m * c + d <= MAX_LEN}
    return sorted(spread | extra | {7, MAX_LEN})


def modeled_build_us(artifact) -> tuple[float, int] | None:
    """The npu backend's modeled graph-build time of an artifact's programs (µs, MODELED) and its npu graphs.

    Each npu task (partition) is one static NPU graph, built once; the
    backend's cost model writes its modeled build time in the task's spec.
    None: no npu task (a ``cpu`` target, or nothing the npu placement takes).
    """
    total, graphs = 0.0, 0
    for program in artifact.manifest["programs"].values():
        for task in program["tasks"]:
            modeled = task["spec"].get("modeled") if isinstance(task.get("spec"), dict) else None
            if modeled is not None and "build_us" in modeled:
                total, graphs = total + modeled["build_us"], graphs + 1
    return (total, graphs) if graphs else None


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _llm(model, chunk_art, decode_art, chunk: int) -> CompiledLLM:
    index = {"prefill": {}, "decode": DECODE, "chunk": chunk_index(chunk, model.config.num_hidden_layers)}
    parts = {index["chunk"]["program"]: chunk_art, DECODE: decode_art}
    return CompiledLLM(CompiledModel(merge_programs(parts, default_program=DECODE, llm=index)))


def _sweep_chunk(model, chunk: int, decode_art, lengths: list[int], prompt, eager: dict, common: dict) -> dict:
    """Build the chunk program (timed), prefill every length with it, count the graph shapes it ran."""
    art, build_s = _timed(lambda: compile_program(model, chunk, layerwise=True, **common))
    llm = _llm(model, art, decode_art, chunk)
    shapes, calls, run = set(), [0], llm.chunk_graph.run

    def counting(inputs, *a, **kw):
        shapes.add(tuple(inputs[0].shape))
        calls[0] += 1
        return run(inputs, *a, **kw)
    llm.chunk_graph.run = counting  # this object only: counts the static shapes the sweep needs
    worst = 0.0
    npu_counters.reset()
    for n in lengths:
        logits, _, _ = llm.prefill(prompt[:, :n])
        worst = max(worst, (logits - eager[n]).abs().max().item())
    emulated = npu_counters.stats()  # the npu-emulated kernels' build cache: (graph digest, shapes) keys built
    pads = [len(llm.chunk_starts(n)) * chunk - n for n in lengths]
    return dict(chunk=chunk, graphs=len(shapes), calls=calls[0], build_s=build_s, worst=worst, pad_max=max(pads),
                pad_mean=float(np.mean(pads)), pad_share=sum(pads) / (sum(pads) + sum(lengths)),
                modeled=modeled_build_us(art), emulated=emulated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--sample", type=int, default=8, help="per-length programs compiled and timed")
    parser.add_argument("--all", action="store_true", help="compile every per-length program (no extrapolation)")
    parser.add_argument("--target", default="cpu", help="kiln target of every program (npu: modeled build times)")
    parser.add_argument("--int8", action="store_true", help="CompileOptions(int8=Int8Quantization()): w8a8 linears "
                        "(with --target npu, on the emulated npu); logits then differ from eager by int8 error")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, (ids,) = zoo.llama(seq=CAPACITY // 2)  # max_position_embeddings = CAPACITY
    lengths = sweep_lengths(args.chunks)
    options = None
    if args.int8:
        from kiln import CompileOptions
        from kiln.passes.extract_outliers import Int8Quantization
        options = CompileOptions(int8=Int8Quantization())
    common = dict(capacity=CAPACITY, target=args.target, options=options)
    print(f"machine: {machine()}")
    print(f"model: zoo.llama (hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
          f"vocab {model.config.vocab_size}), {'w8a8 (int8)' if args.int8 else 'fp32'}, target {args.target!r}, "
          f"KV capacity {CAPACITY}; load average {os.getloadavg()[0]:.1f}")
    print(f"sweep: {len(lengths)} prompt lengths from {lengths[0]} to {lengths[-1]} "
          f"(under one chunk: {sum(n < min(args.chunks) for n in lengths)}; exact multiples of "
          f"{args.chunks[0]}: {sum(n % args.chunks[0] == 0 for n in lengths)})")

    decode_art, decode_s = _timed(lambda: compile_program(model, 1, **common))
    with torch.no_grad():
        prompt = torch.randint(0, model.config.vocab_size, (1, MAX_LEN), generator=torch.Generator().manual_seed(1))
        eager = {n: model(prompt[:, :n]).logits[:, -1] for n in lengths}

    rows = [_sweep_chunk(model, chunk, decode_art, lengths, prompt, eager, common) for chunk in args.chunks]

    # Without chunking: one static graph per distinct length.
    measure = lengths if args.all else sorted({lengths[int(i)] for i in np.linspace(0, len(lengths) - 1, args.sample)})
    per_length = {}
    modeled_per_length = []
    for n in measure:
        art, per_length[n] = _timed(lambda n=n: compile_program(model, n, **common))
        modeled_per_length.append(modeled_build_us(art))
    if args.all:
        total_s, how = sum(per_length.values()), f"measured, all {len(lengths)}"
    else:
        slope, intercept = np.polyfit(list(per_length), list(per_length.values()), 1)
        total_s = float(sum(intercept + slope * n for n in lengths))
        how = (f"EXTRAPOLATED from {len(per_length)} measured ({min(per_length.values()):.2f}-"
               f"{max(per_length.values()):.2f} s each; fit {intercept:.2f} s + {slope * 1e3:.3f} ms/token)")
    pow2 = [b for b in (2 ** i for i in range(3, 11)) if b <= CAPACITY]
    bucket_pads = [min(b for b in pow2 if b >= n) - n for n in lengths]

    print()
    print(f"{'prefill':<26}{'graphs':>8}{'pad max':>9}{'pad mean':>10}{'pad share':>11}{'build s':>10}"
          f"{'calls':>7}{'max |dlogit| vs eager':>24}")
    for r in rows:
        print(f"{'chunk ' + str(r['chunk']):<26}{r['graphs']:>8}{r['pad_max']:>9}{r['pad_mean']:>10.1f}"
              f"{r['pad_share']:>11.1%}{r['build_s']:>10.2f}{r['calls']:>7}{r['worst']:>24.2e}")
    print(f"{'one graph per length':<26}{len(set(lengths)):>8}{0:>9}{0:>10.1f}{0:>11.1%}{total_s:>10.1f}"
          f"{len(lengths):>7}{'':>24}")
    print(f"{'power-of-two buckets':<26}{len({min(b for b in pow2 if b >= n) for n in lengths}):>8}"
          f"{max(bucket_pads):>9}{np.mean(bucket_pads):>10.1f}"
          f"{sum(bucket_pads) / (sum(bucket_pads) + sum(lengths)):>11.1%}{'':>10}{len(lengths):>7}{'':>24}")
    print()
    print(f"per-length build time: {how}")
    print(f"decode program (needed either way, not in the table): {decode_s:.2f} s, measured")
    for r in rows:
        print(f"chunk {r['chunk']}: one build serves all {len(lengths)} lengths: "
              f"{total_s / r['build_s']:.0f}x less build time than one graph per length")
    if all(m is None for m in [r["modeled"] for r in rows] + modeled_per_length):
        print("npu modeled graph builds: n/a (no npu tasks in these artifacts: run with --target npu --int8; "
              "modeled_build_us() is the hook)")
    else:
        for r in rows:
            us, graphs = r["modeled"] or (0.0, 0)
            e = r["emulated"]
            print(f"npu, chunk {r['chunk']}: {graphs} npu graphs in the one program, {us / 1e6:.2f} s MODELED build; "
                  f"the sweep called npu graphs {e['calls']} times and built {e['builds']} (counted by the emulator's "
                  f"build cache), {e['modeled_build_us'] / 1e6:.2f} s MODELED build, "
                  f"{e['modeled_execute_us'] / 1e3:.1f} ms MODELED execute")
        known = [m for m in modeled_per_length if m is not None]
        if known:
            us, graphs = np.mean([m[0] for m in known]), np.mean([m[1] for m in known])
            print(f"npu, one graph per length: {graphs:.0f} npu graphs per program x {len(lengths)} lengths = "
                  f"{graphs * len(lengths):.0f} builds, {us * len(lengths) / 1e6:.1f} s MODELED build "
                  f"(EXTRAPOLATED from {len(known)} programs)")
    print("graphs: distinct static programs the sweep ran (on npu each is its npu partitions' graphs, counted "
          "above); build times: kiln's compile of each program on this machine (wall clock, a shared machine: see the "
          "load average); graphs and padding are counts")


if __name__ == "__main__":
    main()
