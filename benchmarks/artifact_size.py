"""Bytes on disk of an LLM saved as one artifact (4 prefill buckets + decode) against one graph's artifact.

An LLM is one artifact whose programs ``prefill_<bucket>`` and ``decode``
share one weight store (artifact format 2), so it should cost about the bytes
of a single graph's artifact, not one copy of the weights per graph as the
directory of per-graph artifacts kiln 0.1 saved did. This prints the three
sizes: one graph (decode, compiled alone), the one-artifact LLM, and the
graphs saved one artifact each (what kiln 0.1 stored). Nothing is asserted.

    .venv/bin/python benchmarks/artifact_size.py                  # the zoo's small Llama, cpu target
    .venv/bin/python benchmarks/artifact_size.py --hidden 512 --layers 4 --vocab 32000 --target torch
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import kiln  # noqa: E402
from kiln import zoo  # noqa: E402
from kiln.llm.hf import KVCacheLM  # noqa: E402
from kiln.llm import compile_llm  # noqa: E402
from kiln.runtime import CompiledModel  # noqa: E402
from kiln.timing import machine  # noqa: E402


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--buckets", default="8,16,32,64")
    parser.add_argument("--capacity", type=int, default=128)
    parser.add_argument("--target", default="cpu")
    args = parser.parse_args()
    buckets = tuple(int(b) for b in args.buckets.split(","))

    torch.manual_seed(0)
    model, _ = zoo.llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab, seq=8)
    llm = compile_llm(model, prefill_buckets=buckets, capacity=args.capacity, target=args.target)
    lm = KVCacheLM(model)
    k, v = lm.empty_cache(1, args.capacity)
    single = kiln.compile(lm, (torch.zeros(1, 1, dtype=torch.int64), torch.tensor(0), k, v), target=args.target)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = _bytes(single.save(tmp / "single"))
        merged = _bytes(llm.save(tmp / "llm"))
        # kiln 0.1's layout: every graph its own artifact, each with its own copy of the weights
        separate = 0
        for name in llm.model.programs:
            part = kiln.runtime.artifact.Artifact(
                {**llm.manifest, "programs": {"main": llm.manifest["programs"][name]}, "default_program": "main"},
                llm.artifact.weights, llm.artifact.files)
            tasks = part.manifest["programs"]["main"]["tasks"]
            part.weights = {w: t for w, t in part.weights.items() if any(w in task["weights"] for task in tasks)}
            part.files = {f: d for f, d in part.files.items()
                          if any(f in (*task["files"], *task.get("compiler_files", ())) for task in tasks)}
            separate += _bytes(CompiledModel(part).save(tmp / f"sep_{name}"))
    print(f"machine: {machine()}")
    print(f"Llama {args.hidden} wide, {args.layers} layers, vocab {args.vocab} ({params / 1e6:.2f} MB of parameters), "
          f"target {args.target}, prefill buckets {list(buckets)} + decode, capacity {args.capacity}")
    print(f"  one graph's artifact (decode alone):     {one:>12,} bytes")
    print(f"  the LLM as one artifact (5 programs):    {merged:>12,} bytes  = {merged / one:.3f}x one graph")
    print(f"  one artifact per graph (kiln 0.1):       {separate:>12,} bytes  = {separate / one:.3f}x one graph")


if __name__ == "__main__":
    main()
