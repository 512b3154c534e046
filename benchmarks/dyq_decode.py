"""DyQ decode step at a memory-bound size: kiln's nested low-bit plans against fp32 and bf16 eager.

The model is VLA-shaped: a Llama-style decoder (RMS norm, GQA-free attention
over a fixed KV cache, SwiGLU MLP) with random weights and a 256-bin action
head, run one token at a time (a decode step, M = 1), the regime where every
step reads every weight once and the step time is DRAM bandwidth.

Printed, in one run, every contender's median step time over rounds that each
run every contender once, and a sum over as many bytes as each contender's
weights (the roofline, measured in the same rounds: ratios are medians of
per-round ratios, with quartiles; after each eager call the loop waits 30 ms, untimed, for PyTorch's
OpenMP workers to stop spinning: a w4 step right after a two-thread PyTorch op
took 13.4 ms against 9.5 after a w4 step, and with ``OMP_WAIT_POLICY=PASSIVE``
the same. Only there: on this VM the first call after an idle pause pays
milliseconds to wake the other core, 3-7 ms even for a 0.3 MB sum, which would
inflate the reads); and each contender's step run back to
back (a decode loop's steady state) against the same-size sum run back to back
(this machine's L3 holds part of a 4-bit model's weights from one step to the
next, and a plain read gets the same help):

- fp32 eager, bf16 eager (the model cast), and kiln's cpu target at each plan
  of one compiled artifact: ``w8``, ``w4``, ``w2`` and the DyQ configuration's
  plans (``dyq-hi``: a 4.3-bit budget, 8 bits in the layers measured most
  sensitive and 4 elsewhere; ``w4``; ``dyq-lo``: a 3.2-bit budget, 2 bits in
  the least sensitive and 4 elsewhere);
- each step's bytes of weights read, the time of summing that many bytes (in
  the rounds, and back to back), and the step over the DRAM roofline (bytes
  over the bandwidth of summing a 1 GiB tensor, measured once);
- the bytes held for the DyQ configuration (every view any of its plans
  reads) against the bf16 model's;
- the cost of switching the plan between calls: ``set_controls`` alone, and a
  step that switches against one that does not.

    .venv/bin/python benchmarks/dyq_decode.py [--hidden 2048 --layers 6 --rounds 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import kiln
from kiln.ir.nested import held_bytes
from kiln.timing import machine, paired_speedup, rounds_ms

HEAD_DIM = 128


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Layer(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.heads = d // HEAD_DIM
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x, k_cache, v_cache):
        b, t, d = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(b, t, self.heads, HEAD_DIM).transpose(1, 2)
        k = torch.cat([k_cache, self.k_proj(h).view(b, t, self.heads, HEAD_DIM).transpose(1, 2)], dim=2)
        v = torch.cat([v_cache, self.v_proj(h).view(b, t, self.heads, HEAD_DIM).transpose(1, 2)], dim=2)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DecoderStep(nn.Module):
    """One decode step of a VLA-shaped decoder: the new token's hidden state in, action-bin logits out."""

    def __init__(self, d: int, layers: int, ffn: int, bins: int = 256):
        super().__init__()
        self.layers = nn.ModuleList(Layer(d, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, bins, bias=False)

    def forward(self, x, k_cache, v_cache):
        for i, layer in enumerate(self.layers):
            x = layer(x, k_cache[i], v_cache[i])
        return self.head(self.norm(x))


def back_to_back_ms(fn, steps: int = 12) -> float:
    """``fn`` run ``steps`` times in a row (median milliseconds), after one untimed call."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def read_ms(nbytes: int) -> float:
    """A sum over ``nbytes`` run back to back (median ms): a read at that working-set size."""
    return back_to_back_ms(torch.ones(nbytes // 4).sum, steps=9)


def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second read by a sum over a tensor far larger than the caches (median of 7)."""
    nbytes = int(gib * (1 << 30))
    return nbytes / back_to_back_ms(torch.ones(nbytes // 4).sum, steps=7) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--cache", type=int, default=64, help="KV positions attended to")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--intra-op-threads", default="measure",
                    help="CompileOptions.intra_op_threads: 'measure' (default: each plan's program timed at one "
                         "PyTorch thread and at all, the faster kept), a count, or 'none'")
    args = ap.parse_args()
    print(machine())
    torch.manual_seed(0)
    model = DecoderStep(args.hidden, args.layers, args.ffn).eval()
    heads = args.hidden // HEAD_DIM
    x = torch.randn(1, 1, args.hidden)
    kc = torch.randn(args.layers, 1, heads, args.cache, HEAD_DIM)
    vc = torch.randn(args.layers, 1, heads, args.cache, HEAD_DIM)
    params = sum(p.numel() for p in model.parameters())
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    print(f"model: hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, {params / 1e6:.0f}M parameters "
          f"({linear_weights / 1e6:.0f}M in linears), decode step M=1 over a {args.cache}-position cache")

    # Sensitivity of each layer group on a few random steps picks where dyq-hi spends 8 bits and dyq-lo 2.
    calibration = [(torch.randn(1, 1, args.hidden), kc, vc) for _ in range(2)]
    plans = {"w8": {"default": 8}, "w4": {"default": 4}, "w2": {"default": 2}, "dyq-hi": 4.3, "dyq-lo": 3.2}
    start = time.perf_counter()
    q = kiln.NestedQuantization(plans=plans, default_plan="w4")
    threads = {"none": None, "measure": "measure"}.get(args.intra_op_threads) or int(args.intra_op_threads)
    cm = kiln.compile(model, (x, kc, vc), target=args.target,
                      options=kiln.CompileOptions(quantization=q, calibration=calibration,
                                                  intra_op_threads=threads))
    print(f"kiln compile ({len(plans)} plans): {time.perf_counter() - start:.1f} s")
    report = cm.manifest["quantization"]
    model_bf16 = DecoderStep(args.hidden, args.layers, args.ffn).eval()
    model_bf16.load_state_dict(model.state_dict())
    model_bf16 = model_bf16.to(torch.bfloat16)
    xb, kcb, vcb = x.bfloat16(), kc.bfloat16(), vc.bfloat16()

    bandwidth = read_bandwidth()
    print(f"DRAM read bandwidth (sum of 1 GiB, 2 threads): {bandwidth / 1e9:.1f} GB/s")

    def bytes_read(plan: str) -> int:
        bits = report["plans"][plan]["bits"]
        return sum(layer["bytes_read"][str(bits[layer["group"]])] for layer in report["layers"].values())

    weight_bytes = {"fp32 eager": linear_weights * 4, "bf16 eager": linear_weights * 2,
                    **{f"kiln {p}": bytes_read(p) for p in plans}}
    contenders = {"fp32 eager": lambda: model(x, kc, vc), "bf16 eager": lambda: model_bf16(xb, kcb, vcb)}
    for plan in plans:
        contenders[f"kiln {plan}"] = (lambda p: lambda: cm.run([x, kc, vc], controls={"plan": p}))(plan)
    # The roofline in the same rounds: a sum over as many bytes as each contender's weights (drift between runs on
    # a shared machine moves the bandwidth by a third; a per-round ratio cancels it).
    buffers = {name: torch.ones(b // 4) for name, b in weight_bytes.items()}
    reads = {f"read {name}": t.sum for name, t in buffers.items()}
    with torch.no_grad():
        # Reads first, back to back, so none follows an idle pause; a pause only after each eager call (below).
        times = rounds_ms({**reads, **contenders}, repeat=args.rounds, warmup=2,
                          settle_s={"fp32 eager": 0.03, "bf16 eager": 0.03})
        steady = {}
        for name, fn in contenders.items():
            steady[name] = back_to_back_ms(fn)
            time.sleep(0.03)
    same_size = {name: read_ms(b) for name, b in weight_bytes.items()}
    del buffers, reads
    print("\nms/step: interleaved rounds; read: a sum over as many bytes as the step's weights, in the same rounds, "
          "and x read the step over it (median of per-round ratios); x DRAM: over bytes / the 1 GiB bandwidth; back "
          "to back: the step run in a row, and the same-size sum run in a row")
    print(f"{'contender':<14} {'ms/step':>9} {'vs fp32':>18} {'vs bf16':>18} {'weight MB':>10} {'read ms':>8} "
          f"{'x read':>18} {'x DRAM':>7} {'back to back':>13} {'read':>6} {'x read':>7}")
    for name in contenders:
        ts = times[name]
        ratios = ["{:.2f}x [{:.2f}-{:.2f}]".format(*paired_speedup(times[ref], ts)) for ref in ("fp32 eager", "bf16 eager")]
        ms = statistics.median(ts)
        roof = "{:.2f}x [{:.2f}-{:.2f}]".format(*paired_speedup(ts, times[f"read {name}"]))
        dram = ms / (weight_bytes[name] / bandwidth * 1e3)
        print(f"{name:<14} {ms:9.2f} {ratios[0]:>18} {ratios[1]:>18} {weight_bytes[name] / 1e6:10.1f} "
              f"{statistics.median(times[f'read {name}']):8.2f} {roof:>18} {dram:7.2f} {steady[name]:13.2f} "
              f"{same_size[name]:6.2f} {steady[name] / same_size[name]:7.2f}")
    w2, w4 = (statistics.median(times[f"kiln {p}"]) for p in ("w2", "w4"))
    print(f"w2 step / w4 step: {w2 / w4:.2f} interleaved, {steady['kiln w2'] / steady['kiln w4']:.2f} back to back")

    dyq = ("dyq-hi", "w4", "dyq-lo")  # the DyQ configuration: most to least precise
    for name, among in (("every plan above", tuple(plans)), ("the DyQ configuration (" + ", ".join(dyq) + ")", dyq)):
        held = sum(held_bytes(*layer["shape"], report["group_size"],
                              tuple({report["plans"][p]["bits"][layer["group"]] for p in among}))
                   for layer in report["layers"].values())
        print(f"\nbytes held for {name}: {held / 1e6:.1f} MB = {held / (linear_weights * 2):.1%} of the bf16 linear "
              "weights")
    for plan in plans:
        print(f"  {plan}: avg {report['plans'][plan]['avg_bits']:.2f} bits, reads {bytes_read(plan) / 1e6:.1f} MB")

    # Switching: set_controls alone, and steps alternating two plans against steps on one.
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        cm.set_controls(plan=dyq[i % 3])
    switch = (time.perf_counter() - start) / n
    step = statistics.median(times["kiln w4"]) / 1e3
    print(f"\nswitching the plan: set_controls {switch * 1e6:.1f} us = {switch / step:.3%} of a w4 step")
    with torch.no_grad():
        after_own, after_other = [], []
        for _ in range(args.rounds):
            for previous, into in (("w4", after_own), ("dyq-hi", after_other)):
                cm.run([x, kc, vc], controls={"plan": previous})
                start = time.perf_counter()
                cm.set_controls(plan="w4")
                cm.run([x, kc, vc])
                into.append(time.perf_counter() - start)
    print(f"a w4 step (with its set_controls) right after a dyq-hi step: {statistics.median(after_other) * 1e3:.2f}"
          f" ms; after a w4 step: {statistics.median(after_own) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
