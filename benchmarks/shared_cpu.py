"""Latency with one core kept busy by another process: each contender's slowdown against its quiet latency.

Each workload runs its contenders in interleaved rounds twice in one run:
quiet, then with a competing process spinning on the last core (pinned
there, started before the rounds and killed after). Printed per contender:
median quiet ms, median busy ms, and the slowdown busy / quiet. Contenders:
eager, kiln (the default: the calling thread's full intra-op threads, as
eager), kiln with ``model.threads = AdaptiveThreads()`` (one thread while
calls run slow: ``kiln/runtime/threads.py``), and the peers of
``benchmarks/peers.py`` that are installed (ONNX Runtime, OpenVINO f32).

    .venv/bin/python benchmarks/shared_cpu.py [--models minilm,bert,llama] [--repeat 10] [--peers ort,ov-f32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import kiln  # noqa: E402
from kiln import zoo  # noqa: E402
from kiln.runtime import AdaptiveThreads  # noqa: E402
from kiln.timing import machine, rounds_ms  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import peers  # noqa: E402

MODELS = {
    "minilm": (zoo.minilm, dict(seq=128, batch=1)),
    "bert": (zoo.bert, dict(hidden=768, layers=4, heads=12, vocab=30522, seq=128, batch=1)),
    "llama": (zoo.llama, dict(hidden=512, layers=4, heads=8, kv_heads=4, vocab=32000, seq=128)),
}


def hog(core: int) -> subprocess.Popen:
    """A process spinning on ``core`` until killed."""
    code = f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,bert,llama")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--peers", default=",".join(p for p in ("ort", "ov-f32") if p in peers.installed()),
                    help="peers to include (benchmarks/peers.py), or 'none'")
    args = ap.parse_args()
    print(machine())
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("one core: nothing to share")
    print(f"intra-op threads {torch.get_num_threads()}; the competing process spins on core {cores[-1]}")
    names = [p for p in args.peers.split(",") if p and p != "none"]
    rows = []
    for name in args.models.split(","):
        factory, kwargs = MODELS[name]
        model, inputs = factory(**kwargs)
        model.eval()
        cm = kiln.compile(model, inputs)
        adaptive = kiln.compile(model, inputs)
        adaptive.threads = AdaptiveThreads()
        with torch.no_grad():
            model(*inputs)
            built, failed = peers.build(names, model, inputs)
            contenders = {"eager": lambda m=model, x=inputs: m(*x), "kiln": lambda m=cm, x=inputs: m(*x),
                          "kiln adaptive": lambda m=adaptive, x=inputs: m(*x), **{p: b.run for p, b in built.items()}}
            settle = {p: s for p, s in peers.SETTLE_S.items() if p in contenders}
            quiet = rounds_ms(contenders, args.repeat, settle_s=settle)
            h = hog(cores[-1])
            time.sleep(0.5)
            try:
                busy = rounds_ms(contenders, args.repeat, settle_s=settle)
            finally:
                h.kill()
                h.wait()
        for p, why in failed.items():
            print(f"  {name}: {p} could not run: {why}")
        for who in contenders:
            q, b = statistics.median(quiet[who]), statistics.median(busy[who])
            rows.append((name, who, q, b, b / q))
        print(f"  measured {name}; kiln adaptive: {adaptive.threads}")
    print(f"\n{'workload':8s} {'contender':14s} {'quiet ms':>9s} {'busy ms':>9s} {'slowdown':>9s}")
    for name, who, q, b, s in rows:
        print(f"{name:8s} {who:14s} {q:9.2f} {b:9.2f} {s:8.2f}x")


if __name__ == "__main__":
    main()
