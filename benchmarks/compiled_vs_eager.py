"""kiln vs PyTorch eager (and torch.compile/inductor), measured side by side in one run.

Every model goes through the whole kiln pipeline (trace, passes, the target's
backend). Each round runs every contender once in turn (interleaved, so machine
load hits all of them alike); the table shows median milliseconds after
warm-up and the speed-ups eager/kiln and eager/inductor (> 1.0: faster than
eager) as the median of the per-round ratios with their quartiles in brackets
(a round's contenders ran back to back, so its ratio cancels the drift
between rounds). Nothing here is asserted: it prints measurements.

    .venv/bin/python benchmarks/compiled_vs_eager.py                       # every workload
    .venv/bin/python benchmarks/compiled_vs_eager.py --models llama,llama-decode --repeat 20 --no-inductor
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
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
from kiln import timing  # noqa: E402
from kiln.timing import paired_speedup, rounds_ms  # noqa: E402

LLAMA = dict(hidden=512, layers=4, heads=8, kv_heads=4, vocab=32000)
DECODE_PAST = 127

# name -> (factory, kwargs, description); sizes: the CPU-backend issue's list, real vocabularies.
MODELS = {
    "llama": (zoo.llama, dict(**LLAMA, seq=128), "512 wide, 4 layers, prefill 128 tok"),
    "qwen2": (zoo.qwen2, dict(hidden=512, layers=4, heads=8, kv_heads=4, vocab=32000, seq=128),
              "512 wide, 4 layers, prefill 128 tok"),
    "gpt2": (zoo.gpt2, dict(hidden=768, layers=4, heads=12, vocab=50257, seq=128), "768 wide, 4 layers, 128 tok"),
    "bert": (zoo.bert, dict(hidden=768, layers=4, heads=12, vocab=30522, seq=128, batch=1),
             "768 wide, 4 layers, 128 tok"),
    "vit": (zoo.vit, dict(hidden=768, layers=4, heads=12, image=224, patch=16), "768 wide, 4 layers, 224px"),
    "minilm": (zoo.minilm, dict(seq=128, batch=1), "trained, 128 tok"),
    # Experts as transformers runs them by default (grouped_mm), for eager and for kiln's trace.
    "mixtral": (zoo.mixtral, dict(**LLAMA, experts=8, top_k=2, seq=128),
                "512 wide, 4 layers, 8 experts top-2, 128 tok"),
}
WORKLOADS = [*MODELS, "llama-decode"]


def _eager(model):
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", False) else {}

    def run(*inputs):
        with torch.no_grad():
            return model(*inputs, **kwargs)
    return run


def whole_model(name: str, target: str, inductor: bool):
    """Contenders (no-argument callables) for one forward of a zoo model, and kiln's compile seconds."""
    factory, kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    model, inputs = factory(**kwargs)
    start = time.perf_counter()
    cm = kiln.compile(model, inputs, target=target)
    compile_s = time.perf_counter() - start
    contenders = {"eager": functools.partial(_eager(model), *inputs), "kiln": functools.partial(cm, *inputs)}
    _check_output(name, contenders["eager"](), contenders["kiln"]())
    if inductor:
        contenders["inductor"] = functools.partial(_eager(torch.compile(model)), *inputs)
    return contenders, compile_s


def _check_output(name: str, eager, compiled) -> None:
    """Print how far kiln's output is from eager's, and whether it is within fp32 ``assert_close`` tolerance."""
    from torch.utils import _pytree as pytree

    pairs = list(zip(pytree.tree_leaves(eager), pytree.tree_leaves(compiled)))
    diff = max(float((e.double() - c.double()).abs().max()) for e, c in pairs)
    try:
        for e, c in pairs:
            torch.testing.assert_close(c, e)
        verdict = "within fp32 tolerance"
    except AssertionError:
        verdict = "NOT within fp32 tolerance"
    print(f"  {name}: output vs eager: max abs diff {diff:.2e}, {verdict}")


def llama_decode(target: str, inductor: bool):
    """One new token after a 127-token prompt: HF with its DynamicCache vs kiln's compiled decode graph."""
    from kiln.llm import compile_llm

    torch.manual_seed(0)
    model, (prompt,) = zoo.llama(**LLAMA, seq=DECODE_PAST)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    token = torch.tensor([[7]])

    def eager():
        with torch.no_grad():
            model(token, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # DynamicCache grows in place: drop the new token, back to 127 past tokens

    start = time.perf_counter()
    llm = compile_llm(model, prefill_buckets=(DECODE_PAST + 1,), capacity=DECODE_PAST + 1, target=target)
    compile_s = time.perf_counter() - start
    _, k, v = llm.prefill(prompt)
    return {"eager": eager, "kiln": lambda: llm.decode(token, DECODE_PAST, k, v)}, compile_s


def _speedup(times: dict[str, list[float]], who: str) -> str:
    median, q1, q3 = paired_speedup(times["eager"], times[who])
    return f"{median:.2f}x [{q1:.2f}-{q3:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds per workload (median reported)")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile (its compile is slow)")
    args = parser.parse_args()
    inductor = not args.no_inductor

    console = Console(width=130)
    console.print(f"machine: {timing.machine()}; torch {torch.__version__} "
                  f"({torch.get_num_threads()} threads), kiln {kiln.__version__}, target {args.target}; "
                  f"{args.repeat} interleaved rounds after 3 warm-up rounds (speed-up: median of per-round "
                  f"ratios \\[quartiles]); "
                  f"load average {os.getloadavg()[0]:.2f}")
    table = Table()
    for col in ("workload", "shape", "kiln compile s", "eager ms", "kiln ms", "kiln speed-up"):
        table.add_column(col, justify="left" if col in ("workload", "shape") else "right")
    if inductor:
        table.add_column("inductor ms", justify="right")
        table.add_column("inductor speed-up", justify="right")
    for name in args.models.split(","):
        if name == "llama-decode":
            contenders, compile_s = llama_decode(args.target, inductor)
            shape = f"512 wide, 4 layers, 1 token after {DECODE_PAST} (compile: prefill + decode graphs)"
        else:
            contenders, compile_s = whole_model(name, args.target, inductor)
            shape = MODELS[name][2]
        times = rounds_ms(contenders, args.repeat)
        ms = {who: statistics.median(t) for who, t in times.items()}
        row = [name, shape, f"{compile_s:.1f}", f"{ms['eager']:.2f}", f"{ms['kiln']:.2f}", _speedup(times, "kiln")]
        if inductor:
            row += [f"{ms['inductor']:.2f}", _speedup(times, "inductor")] if "inductor" in ms else ["n/a", "n/a"]
        table.add_row(*row)
        console.print(f"  measured {name}")
    console.print(table)
    if "llama-decode" in args.models and inductor:
        console.print("llama-decode: inductor not timed (HF's growing DynamicCache recompiles every step)")
    console.print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
