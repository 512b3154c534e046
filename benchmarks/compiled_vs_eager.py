"""kiln vs PyTorch eager (and torch.compile/inductor), measured side by side in one run.

Every model goes through the whole kiln pipeline (trace, passes, the target's
backend). Each round runs every contender once in turn (interleaved, so machine
load hits all of them alike); the table shows median milliseconds after
warm-up and the speed-ups eager/kiln and eager/inductor (> 1.0: faster than
eager) as the median of the per-round ratios with their quartiles in brackets
(a round's contenders ran back to back, so its ratio cancels the drift
between rounds). Nothing here is asserted: it prints measurements.

With the ``bench`` extra installed (``pip install -e '.[bench]'``, or ``make bench-peers``), ONNX Runtime
and OpenVINO (f32 hint, and its default precision) run beside them on the same weights and inputs, in the
same rounds (peers.py says how each is built); a second table then shows every contender's speed-up over
eager, kiln's speed-up over it (paired per round), and its fidelity against eager fp32 (max |diff|; top-token
agreement over all positions for LMs, mean-pooled embedding cosine for encoders). ONNX Runtime runs last in
each round with an untimed 100 ms pause after it (its threads spin after returning). A peer that is not
installed or cannot export is listed with the reason, and the run goes on.

    .venv/bin/python benchmarks/compiled_vs_eager.py                       # every workload
    .venv/bin/python benchmarks/compiled_vs_eager.py --models llama,llama-decode --repeat 20 --no-inductor
    .venv/bin/python benchmarks/compiled_vs_eager.py --models minilm,bert,llama --peers ort,ov-f32,ov
    .venv/bin/python benchmarks/compiled_vs_eager.py --models minilm,bert,llama --peers ov --no-inductor --precision bf16

``--model-dtype bf16`` casts each model and its floating-point inputs to bf16 first: eager and kiln then
both run a bf16 model (``--peers none``).

``--precision bf16`` adds the contender ``kiln-bf16`` beside ``kiln`` (fp32): the same model compiled with
``CompileOptions(precision="bf16")`` (GEMMs and attention in bf16, the rest fp32; on a machine without bf16
units kiln compiles fp32 and the run says so), with its fidelity against eager fp32 in the peers table and
a column of its speed-up over each peer (OpenVINO's default precision is bf16 on such a machine).
"""
from __future__ import annotations

import argparse
import dataclasses
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

import peers  # noqa: E402  (benchmarks/peers.py, beside this script)

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


def whole_model(name: str, target: str, inductor: bool, peer_names: tuple[str, ...] = (), bf16: bool = False,
                model_dtype: torch.dtype = torch.float32):
    """Contenders (no-argument callables) for one forward of a zoo model, kiln's compile seconds, and a
    :class:`PeerReport` when ``peer_names`` asks for peers (ONNX Runtime, OpenVINO). ``model_dtype``
    bf16: the model's weights and floating-point inputs cast to bf16, for eager and kiln alike."""
    factory, kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    model, inputs = factory(**kwargs)
    if model_dtype != torch.float32:
        model = model.to(model_dtype)
        inputs = tuple(x.to(model_dtype) if x.is_floating_point() else x for x in inputs)
    start = time.perf_counter()
    cm = kiln.compile(model, inputs, target=target)
    compile_s = time.perf_counter() - start
    contenders = {"eager": functools.partial(_eager(model), *inputs), "kiln": functools.partial(cm, *inputs)}
    eager_out, kiln_out = contenders["eager"](), contenders["kiln"]()
    _check_output(name, eager_out, kiln_out)
    if bf16:
        cm16 = kiln.compile(model, inputs, target=target, options=kiln.CompileOptions(precision="bf16"))
        contenders["kiln-bf16"] = functools.partial(cm16, *inputs)
        bf16_out = contenders["kiln-bf16"]()
        stats = next(p["stats"] for p in cm16.manifest["passes"] if p["name"] == "lower_precision")
        print(f"  {name}: kiln-bf16: " + ", ".join(f"{k} {v}" for k, v in stats.items() if k != "left_fp32"))
    if inductor:
        contenders["inductor"] = functools.partial(_eager(torch.compile(model)), *inputs)
    if not peer_names:
        return contenders, compile_s, None
    report = PeerReport(failed={})
    outputs = {"kiln": lambda: peers.flat_outputs(kiln_out)}
    if bf16:
        outputs["kiln-bf16"] = lambda: peers.flat_outputs(bf16_out)
        report.precision["kiln-bf16"] = stats["precision"]
    if inductor:
        outputs["inductor"] = lambda: peers.flat_outputs(contenders["inductor"]())
    built, report.failed = peers.build(peer_names, model, inputs)
    for peer in sorted(built.values(), key=lambda p: p.name == "ort"):  # ORT last in each round
        contenders[peer.name] = peer.run
        outputs[peer.name] = peer.outputs
        report.precision[peer.name] = peer.precision
        print(f"  {name}: {peer.name}: {peer.note}")
    for who, out in outputs.items():
        try:
            report.fidelity[who] = peers.fidelity(eager_out, out(), inputs)
        except Exception as exc:  # a metric that does not apply is reported, not fatal
            report.fidelity[who] = f"n/a ({peers.one_line(exc)})"
    return contenders, compile_s, report


@dataclasses.dataclass
class PeerReport:
    """One workload's side of the peers table: each contender's fidelity vs eager and precision, and the
    peers that could not run with the reason."""

    failed: dict[str, str]
    fidelity: dict[str, object] = dataclasses.field(default_factory=dict)
    precision: dict[str, str] = dataclasses.field(default_factory=dict)


def _check_output(name: str, eager, compiled) -> None:
    """Print how far kiln's output is from eager's, and whether it is within ``assert_close``'s tolerance
    for the outputs' dtype."""
    from torch.utils import _pytree as pytree

    pairs = list(zip(pytree.tree_leaves(eager), pytree.tree_leaves(compiled)))
    diff = max(float((e.double() - c.double()).abs().max()) for e, c in pairs)
    dtypes = "/".join(sorted({str(e.dtype).removeprefix("torch.") for e, _ in pairs}))
    try:
        for e, c in pairs:
            torch.testing.assert_close(c, e)
        verdict = f"within {dtypes} tolerance"
    except AssertionError:
        verdict = f"NOT within {dtypes} tolerance"
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


def _peer_rows(name: str, times: dict[str, list[float]], ms: dict[str, float], report: PeerReport) -> list[list[str]]:
    """The peers table's rows for one workload: kiln, inductor and each peer that ran."""
    rows = []
    for who in times:
        if who == "eager":
            continue
        fid = report.fidelity.get(who, "n/a")
        diff = f"{fid.max_abs:.1e}" if isinstance(fid, peers.Fidelity) else "n/a"
        kiln_over = [("-" if who == k else _speedup({"eager": times[who], "kiln": times[k]}, "kiln"))
                     for k in ("kiln", "kiln-bf16") if k in times]
        rows.append([name, who, report.precision.get(who, "f32"), f"{ms[who]:.2f}", _speedup(times, who), *kiln_over,
                     diff, str(fid)])
    return rows


def _peer_table(rows: list[list[str]], bf16: bool = False) -> Table:
    table = Table(title="against the peers (same weights, inputs and rounds; fidelity vs eager fp32)")
    cols = ("workload", "contender", "precision", "ms", "speed-up over eager", "kiln speed-up over it",
            *(("kiln-bf16 speed-up over it",) if bf16 else ()), "max |diff|", "agreement")
    for col in cols:
        table.add_column(col, justify="left" if col in ("workload", "contender", "precision", "agreement") else "right")
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=i + 1 < len(rows) and rows[i + 1][0] != row[0])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds per workload (median reported)")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile (its compile is slow)")
    parser.add_argument("--peers", default=None,
                        help=f"comma-separated, from {', '.join(peers.PEERS)}, or 'none' "
                             f"(default: those installed: {', '.join(peers.installed()) or 'none'})")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: also time kiln compiled with CompileOptions(precision='bf16') (kiln-bf16)")
    parser.add_argument("--model-dtype", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: the models' weights and inputs in bf16, eager's and kiln's alike (not with "
                             "--peers or --precision bf16)")
    args = parser.parse_args()
    bf16 = args.precision == "bf16"
    model_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.model_dtype]
    if model_dtype != torch.float32:
        if bf16 or args.peers not in (None, "none") or "llama-decode" in args.models:
            parser.error("--model-dtype bf16 times eager and kiln only: no --peers, no --precision bf16, "
                         "no llama-decode")
        args.peers = "none"
    inductor = not args.no_inductor
    if args.peers is None:
        peer_names = tuple(peers.installed())
    else:
        peer_names = tuple(p for p in args.peers.split(",") if p and p != "none")
        unknown = [p for p in peer_names if p not in peers.PEERS]
        if unknown:
            parser.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(peers.PEERS)}")

    console = Console(width=130)
    console.print(f"machine: {timing.machine()}; torch {torch.__version__} "
                  f"({torch.get_num_threads()} threads), kiln {kiln.__version__}, target {args.target}, "
                  f"models in {args.model_dtype}; "
                  f"{args.repeat} interleaved rounds after 3 warm-up rounds (speed-up: median of per-round "
                  f"ratios \\[quartiles]); "
                  f"load average {os.getloadavg()[0]:.2f}")
    table = Table()
    for col in ("workload", "shape", "kiln compile s", "eager ms", "kiln ms", "kiln speed-up"):
        table.add_column(col, justify="left" if col in ("workload", "shape") else "right")
    if bf16:
        table.add_column("kiln-bf16 ms", justify="right")
        table.add_column("kiln-bf16 speed-up", justify="right")
    if inductor:
        table.add_column("inductor ms", justify="right")
        table.add_column("inductor speed-up", justify="right")
    peer_rows = []
    # With the default --peers, the ones not installed are named too (a user may not know of the extra).
    not_run = [] if args.peers is not None else [f"{p}: {peers.missing(p)}" for p in peers.PEERS if peers.missing(p)]
    for name in args.models.split(","):
        report = None
        if name == "llama-decode":
            contenders, compile_s = llama_decode(args.target, inductor)
            shape = f"512 wide, 4 layers, 1 token after {DECODE_PAST} (compile: prefill + decode graphs)"
            not_run += [f"{p} on llama-decode: not exported (a decode step with HF's growing KV cache)"
                        for p in peer_names]
        else:
            contenders, compile_s, report = whole_model(name, args.target, inductor, peer_names, bf16, model_dtype)
            shape = MODELS[name][2]
        times = rounds_ms(contenders, args.repeat, settle_s={p: s for p, s in peers.SETTLE_S.items() if p in contenders})
        ms = {who: statistics.median(t) for who, t in times.items()}
        if report is not None:
            peer_rows += _peer_rows(name, times, ms, report)
            not_run += [f"{p} on {name}: {why}" for p, why in report.failed.items()]
        row = [name, shape, f"{compile_s:.1f}", f"{ms['eager']:.2f}", f"{ms['kiln']:.2f}", _speedup(times, "kiln")]
        if bf16:
            row += [f"{ms['kiln-bf16']:.2f}", _speedup(times, "kiln-bf16")] if "kiln-bf16" in ms else ["n/a", "n/a"]
        if inductor:
            row += [f"{ms['inductor']:.2f}", _speedup(times, "inductor")] if "inductor" in ms else ["n/a", "n/a"]
        table.add_row(*row)
        console.print(f"  measured {name}")
        del contenders, times  # the peers' sessions and weights go before the next workload builds its own
    console.print(table)
    if peer_rows:
        console.print(_peer_table(peer_rows, bf16))
    if peer_names or not_run:
        console.print("peers could not run: " + ("none" if not not_run else ""))
        for line in not_run:
            console.print(f"  {line}", markup=False)
    if "llama-decode" in args.models and inductor:
        console.print("llama-decode: inductor not timed (HF's growing DynamicCache recompiles every step)")
    console.print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
