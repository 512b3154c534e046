"""``kiln::int8_linear``'s CPU kernels side by side: the ``torch._int_mm`` reference and the prepacked oneDNN kernel.

Per shape (M rows, K in, N out) and thread count (1: how the npu queue's
worker runs it; 2: for reference): milliseconds per call of the whole op
(quantize x, the int8 matmul, rescale, bias) as it was before the prepacked
path (``orig``: the contract's arithmetic, each step a new tensor), through
the reference kernel (``ref``, ``int8_linear_reference``: ``torch._int_mm`` on
the int8 weight, the same steps in place) and through the prepacked one
(``new``: ``torch.ops.kiln.int8_linear`` on a weight that
``prepack_int8_linear_weight`` reordered once into oneDNN's layout, as the
npu loader does), and the matmuls alone (``_int_mm`` /
``onednn::qlinear_pointwise``); interleaved rounds, medians; ratios = theirs
/ the prepacked one's (> 1: faster). Every shape's results are checked
bitwise equal before timing. These are CPU kernels of the *emulated* NPU: no
NPU time is measured or modeled here. About 20 s on 2 cores.

    .venv/bin/python benchmarks/int8_linear_kernels.py [--budget 0.2] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from kiln import timing
from kiln.ir import ops

ROWS = (1, 64, 128)
KN = ((768, 768), (768, 3072), (3072, 768), (768, 32000))  # GPT-2-sized projections, FFN up/down, LM head


def _case(m: int, k: int, n: int):
    g = torch.Generator().manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = None if n == 32000 else torch.randn(n, generator=g)  # LM heads have none
    return x, w, s, bias, x.abs().max().item() / 127


def _original(x, w, s, bias, x_scale):
    """The op's kernel before the prepacked path: the contract's arithmetic, every step a new tensor."""
    rows = x.reshape(-1, x.shape[-1])
    codes = torch.clamp(torch.round(rows.float() / x_scale), -127, 127).to(torch.int8)
    out = torch._int_mm(codes, w.t()).to(torch.float32) * (s * x_scale)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


def _contenders(x, w, s, bias, x_scale):
    _, _, _, packed, zeros = ops._packed_entry(w)
    ones = torch.ones(w.shape[0])
    codes = ops.quantize_activation(x, x_scale)
    return {
        "orig": lambda: _original(x, w, s, bias, x_scale),
        "ref": lambda: ops.int8_linear_reference(x, w, s, bias, x_scale),
        "new": lambda: torch.ops.kiln.int8_linear(x, w, s, bias, x_scale),
        "int_mm": lambda: torch._int_mm(codes, w.t()),
        "onednn": lambda: torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, packed, ones, zeros, None, 1.0, 0,
                                                             torch.float32, "none", [], ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.2, help="seconds of measuring per kernel and shape")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"machine: {timing.machine()}")
    exact = ops._onednn_int8_is_exact()
    print(f"torch {torch.__version__}; oneDNN int8 exact here (VNNI/AMX): {exact}; "
          f"load average {os.getloadavg()[0]:.2f}")
    if not exact:
        print("no prepacked kernel on this CPU: the op runs the reference")
        return
    weights = {}
    for k, n in KN:
        _, w, *_ = _case(1, k, n)
        start = time.perf_counter()
        assert ops.prepack_int8_linear_weight(w)
        weights[k, n] = w
        print(f"prepack {k}x{n} (once, at load): {(time.perf_counter() - start) * 1e3:.1f} ms")
    print(f"{'thr':>3} {'M':>4} {'K':>5} {'N':>6} | {'orig ms':>8} {'ref ms':>7} {'new ms':>7} {'orig/new':>8} "
          f"{'ref/new':>7} | {'_int_mm ms':>10} {'onednn ms':>9} {'ratio':>6}")
    before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            busy = os.getloadavg()[0]
            if threads > 1 and busy > 0.5:
                print(f"note: load average {busy:.2f} on {os.cpu_count()} cores: {threads}-thread rows share cores "
                      "with other work (a thread descheduled mid-call stalls the call)")
            for m in ROWS:
                for k, n in KN:
                    x, _, s, bias, x_scale = _case(m, k, n)
                    w = weights[k, n]
                    ref = ops.int8_linear_reference(x, w, s, bias, x_scale)
                    assert torch.equal(torch.ops.kiln.int8_linear(x, w, s, bias, x_scale), ref), (m, k, n)
                    assert torch.equal(_original(x, w, s, bias, x_scale), ref), (m, k, n)
                    contenders = _contenders(x, w, s, bias, x_scale)
                    one = timing.median_ms({"ref": contenders["ref"]}, repeat=3, warmup=1)["ref"]
                    repeat = max(5, min(50, int(args.budget * 1e3 / max(one, 1e-3))))
                    ms = {name: statistics.median(t) for name, t in
                          timing.rounds_ms(contenders, repeat=repeat, warmup=2).items()}
                    print(f"{threads:>3} {m:>4} {k:>5} {n:>6} | {ms['orig']:>8.3f} {ms['ref']:>7.3f} {ms['new']:>7.3f} "
                          f"{ms['orig'] / ms['new']:>8.2f} {ms['ref'] / ms['new']:>7.2f} | {ms['int_mm']:>10.3f} "
                          f"{ms['onednn']:>9.3f} {ms['int_mm'] / ms['onednn']:>6.2f}", flush=True)
    finally:
        torch.set_num_threads(before)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
