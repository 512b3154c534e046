"""kiln's generated low-bit kernels (kiln/backends/cpu/lowbit.py) against eager PyTorch, weights cycled through DRAM.

For each weight shape: one activation row (decode) and M = 64 / 128 rows (prefill). Each contender
gets its own distinct copies of its weights, together larger than ``--cycle-mb`` (default 4x the
L3 size), and each call reads the next copy, so no call finds its weights in a cache. A round runs
one pass over fp32 ``F.linear``'s copies and one over the contender's; the ratio is the median of
the rounds' fp32/contender time ratios (> 1: faster than fp32), with quartiles. "reads" is the
bytes of weights and scales one call reads; "roofline" is that over the read bandwidth this
script measures (a sum over a buffer of ``--cycle-mb``, all threads) and "x roof" the time over it.

Decode contenders: fp32 / bf16 ``F.linear``; ``torch._weight_int8pack_mm`` (bf16 x, int8
per-channel); ``torch._weight_int4pack_mm_for_cpu`` (bf16 x, group 128); kiln's fused kernel per
view (8, 4, 2 bits; fp32 and bf16 x). Prefill adds kiln's dequantizer (the 4-bit view as fp32 /
bf16) + ``F.linear``, and the fused kernel with x tiles of 8 rows; prefill is compute-bound, so
it cycles through at most 8 copies. ``--schedules`` adds the 4-bit decode kernel in the other
schedules (``vnni``: 256-bit, ``fma``: codes converted to fp32).

    .venv/bin/python benchmarks/lowbit_kernels.py [--shapes 4096x4096,2048x8192,8192x2048] [--rows 1,64,128]
        [--rounds 10] [--schedules] [--cycle-mb MB] [--threads T]

Measured with ``--rows 1`` (Intel Xeon, AVX-512 VNNI / BF16 / AMX, 2 cores, LLVM target "rocketlake";
TVM and PyTorch on 2 threads; read bandwidth 21.3 GB/s; the kernels with their row-end tree sums, vector
x digits and two digits of x). 4096x4096, M = 1 (ms per call; x fp32: median of paired per-round time
ratios; x roof: time over bytes / 21.3 GB/s):

    contender                ms/call  x fp32  reads MB  x roof      contender             ms/call  x roof
    fp32 F.linear              2.467    1.00     67.11    0.78      bf16 F.linear           1.679    1.07
    int8pack_mm bf16           0.842    0.33     16.79    1.07      int4pack_mm bf16 g128   0.734    1.75
    kiln 8-bit fp32            0.777    0.27     17.30    0.96      kiln 8-bit bf16         0.781    0.96
    kiln 4-bit fp32            0.411    0.13      8.91    0.98      kiln 4-bit bf16         0.403    0.96
    kiln 2-bit fp32            0.297    0.10      4.72    1.34      kiln 2-bit bf16         0.259    1.17

The 4-bit kernel reads at the bandwidth of a ``torch.sum`` (0.98x its roofline), 1.8x faster than
``torch._weight_int4pack_mm_for_cpu``, at 0.13x fp32 ``F.linear``'s time; the 2-bit kernel takes
0.72x (fp32 x) / 0.64x (bf16 x) the 4-bit time. (Before this version TVM ran on one thread here, as it
halves an x86 core count unless told, and a row's 32 lanes were summed one by one: 4-bit fp32 0.87 ms,
2.1x the roofline.) What changed it, one row of x at a time (1024x2048 weights, one thread, from L2):
the tree sum 0.112 -> 0.079 ms, two digits of fp32 x instead of three 0.079 -> 0.065 (2-bit: 0.054 ->
0.045), the vector x digits ~3 us of ~7 us fixed cost per call. Removing the plane unpacking altogether
(wrong results, timing only) gains 9% on 5632x2048 from DRAM: the decode kernel is bound by memory,
not its instructions. Earlier prefill measurements (M = 64 / 128, ms per call): fp32 F.linear 28.5 /
45.2, bf16 F.linear 8.8 / 14.0, int8pack 32.2 / 57.5, int4pack 32.4 / 28.7, kiln 4-bit dequantize +
F.linear fp32 30.9 / 53.6, bf16 15.3 / 17.2, kiln fused (8-row x tiles) fp32 41.4 / 88.9, bf16
25.5 / 51.7.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kiln import timing
from kiln.backends.cpu import lowbit as L

G = 128


def l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 64 << 20


def read_bandwidth(total: int) -> float:
    """Bytes per second of a ``torch.sum`` over ``total`` bytes in 64 MiB pieces (best of 3 passes)."""
    pieces = [torch.ones((64 << 20) // 4) for _ in range(max(1, total // (64 << 20)))]
    best = math.inf
    for _ in range(4):
        start = time.perf_counter()
        for p in pieces:
            p.sum()
        best = min(best, time.perf_counter() - start)
    return len(pieces) * (64 << 20) / best


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copies_for(per_copy: int, cycle: int, cap: int | None = None) -> int:
    n = max(2, math.ceil(cycle / per_copy))
    return min(n, cap) if cap else n


class Contender:
    """One way of computing the linear: its calls (one per weight copy) and the bytes a call reads."""

    def __init__(self, name: str, calls: list, reads: int):
        self.name, self.calls, self.reads = name, calls, reads

    def run_pass(self) -> float:
        start = time.perf_counter()
        for call in self.calls:
            call()
        return (time.perf_counter() - start) / len(self.calls)


def nested_planes(n: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"hi": torch.randint(0, 256, (n, k // 4), dtype=torch.uint8, generator=gen),
            "mid": torch.randint(0, 256, (n, k // 4), dtype=torch.uint8, generator=gen),
            "lo": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)}


def build_contenders(m: int, n: int, k: int, cycle: int, cap: int | None, prefill: bool, other_schedules: bool):
    """Factories (name -> () -> Contender), so each contender's copies exist only while it is measured."""
    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(n, k, generator=gen) * 0.02
    x32 = torch.randn(m, k, generator=gen)
    xb = x32.bfloat16()
    planes = nested_planes(n, k, gen)
    scale = (torch.rand(n, k // G, generator=gen) * 1e-3).half()
    offset = (torch.randn(n, k // G, generator=gen) * 1e-2).half()
    factories = {}

    def dense(dtype):
        w = w32.to(dtype)
        x = x32 if dtype == torch.float32 else xb
        nc = copies_for(nbytes(w), cycle, cap)
        ws = [w.clone() for _ in range(nc)]
        return Contender("", [lambda w=w: F.linear(x, w) for w in ws], nbytes(w))

    factories["fp32 F.linear"] = lambda: dense(torch.float32)
    factories["bf16 F.linear"] = lambda: dense(torch.bfloat16)

    def int8pack():
        w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        s = torch.rand(n, generator=gen).bfloat16()
        nc = copies_for(nbytes(w8, s), cycle, cap)
        ws = [(w8.clone(), s.clone()) for _ in range(nc)]
        return Contender("", [lambda w=w, s=s: torch._weight_int8pack_mm(xb, w, s) for w, s in ws], nbytes(w8, s))

    def int4pack():
        packed = torch._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 2)
        sz = (torch.rand(k // G, n, 2, generator=gen) * 1e-2).bfloat16()
        nc = copies_for(nbytes(packed, sz), cycle, cap)
        ws = [(packed.clone(), sz.clone()) for _ in range(nc)]
        return Contender("", [lambda w=w, s=s: torch._weight_int4pack_mm_for_cpu(xb, w, G, s) for w, s in ws],
                         nbytes(packed, sz))

    factories["int8pack_mm bf16"] = int8pack
    factories["int4pack_mm bf16 g128"] = int4pack

    def kiln_fused(bits, dtype, m_tile=4, schedule=None):
        x = x32 if dtype == "float32" else xb
        kernel = L.build(L.decode_func(m, n, k, bits, dtype=dtype, m_tile=m_tile, schedule=schedule))
        view = [planes[p] for p in L.PLANES_OF[bits]] + [scale, offset]
        nc = copies_for(nbytes(*view), cycle, cap)
        sets = [[t.clone() for t in view] for _ in range(nc)]
        y = torch.empty(m, n, dtype=x.dtype)
        return Contender("", [lambda a=a: kernel(x, *a, y) for a in sets], nbytes(*view))

    def kiln_dequant(bits, dtype):
        x = x32 if dtype == "float32" else xb
        kernel = L.build(L.dequantize_func(n, k, bits, dtype=dtype))
        view = [planes[p] for p in L.PLANES_OF[bits]] + [scale, offset]
        nc = copies_for(nbytes(*view), cycle, cap)
        sets = [[t.clone() for t in view] for _ in range(nc)]
        w = torch.empty(n, k, dtype=x.dtype)
        return Contender("", [lambda a=a: F.linear(x, kernel(*a, w)) for a in sets], nbytes(*view))

    for dtype, tag in (("float32", "fp32"), ("bfloat16", "bf16")):
        for bits in (8, 4, 2):
            if not prefill or bits == 4:
                factories[f"kiln {bits}-bit {tag}"] = lambda b=bits, d=dtype: kiln_fused(b, d, 8 if prefill else 4)
        if prefill:
            factories[f"kiln 4-bit dequant+F.linear {tag}"] = lambda d=dtype: kiln_dequant(4, d)
        elif other_schedules:
            for schedule in L.SCHEDULES:
                if schedule != L.default_schedule() and (schedule == "fma" or L.has_vnni()):
                    factories[f"kiln 4-bit {tag} [{schedule}]"] = lambda d=dtype, s=schedule: kiln_fused(4, d, 4, s)
    return factories


def measure(m: int, n: int, k: int, cycle: int, rounds: int, bandwidth: float, other_schedules: bool) -> None:
    prefill = m > 8
    cap = 8 if prefill else None
    factories = build_contenders(m, n, k, cycle, cap, prefill, other_schedules)
    base = factories.pop("fp32 F.linear")()
    rows = []
    base_all = []
    for name, make in [("fp32 F.linear", None), *factories.items()]:
        contender = base if make is None else make()
        base_t, cont_t = [], []
        for _ in range(2):  # warm-up passes
            base.run_pass(), contender.run_pass()
        for _ in range(rounds):  # 30 ms apart: PyTorch's OpenMP workers spin after a call and slow TVM's pool
            base_t.append(base.run_pass())
            time.sleep(0.03)
            cont_t.append(contender.run_pass())
            time.sleep(0.03)
        base_all += base_t
        ratio, q1, q3 = timing.paired_speedup(base_t, cont_t)
        ms = statistics.median(cont_t) * 1e3
        roof = contender.reads / bandwidth * 1e3
        rows.append((name, ms, ratio, q1, q3, contender.reads, roof, len(contender.calls)))
        del contender
    print(f"\n{n}x{k} weight (N x K), M = {m} ({'prefill' if prefill else 'decode'}); fp32 F.linear's median "
          f"over all rounds {statistics.median(base_all) * 1e3:.3f} ms")
    print(f"{'contender':34s} {'ms/call':>8s} {'x fp32':>7s} {'[q1-q3]':>13s} {'reads MB':>9s} {'roofline ms':>11s} "
          f"{'x roof':>7s} {'copies':>6s}")
    for name, ms, ratio, q1, q3, reads, roof, nc in rows:
        print(f"{name:34s} {ms:8.3f} {1 / ratio:7.3f} [{1 / q3:.2f}-{1 / q1:.2f}] {reads / 1e6:9.2f} {roof:11.3f} "
              f"{ms / roof:7.2f} {nc:6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096", help="N x K weights, comma-separated")
    parser.add_argument("--rows", default="1,64,128", help="activation rows M, comma-separated")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cycle-mb", type=int, default=None, help="bytes of weight copies per contender "
                        "(default: 4x the L3 size)")
    parser.add_argument("--schedules", action="store_true", help="also the 4-bit decode kernel in the schedules "
                        "that are not this CPU's default (vnni, fma)")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and TVM (default: all cores)")
    args = parser.parse_args()
    # Before TVM's thread pool starts (at the first kernel call); unset, TVM would halve an x86 core count.
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    cycle = (args.cycle_mb << 20) if args.cycle_mb else 4 * l3_bytes()
    print(f"machine: {timing.machine()}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), TVM {L.tvm.__version__} "
          f"({os.environ['TVM_NUM_THREADS']} threads) "
          f"(target {L.host_target()}), decode schedule {L.default_schedule()}; load average "
          f"{os.getloadavg()[0]:.2f}")
    bandwidth = read_bandwidth(cycle)
    print(f"L3 {l3_bytes() >> 20} MiB; weight copies per contender > {cycle >> 20} MiB; read bandwidth "
          f"(torch.sum over {cycle >> 20} MiB) {bandwidth / 1e9:.1f} GB/s")
    print("x fp32: the contender's time over fp32 F.linear's (< 1: faster), median of paired rounds [quartiles]")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        for m in (int(v) for v in args.rows.split(",")):
            measure(m, n, k, cycle, args.rounds, bandwidth, args.schedules)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
