"""Wall-clock comparison of callables, interleaved so machine load hits them all alike.

Used by the demo, ``benchmarks/`` and ``kiln run``; never by tests (a test
asserts behaviour, not time).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def median_ms(contenders: dict[str, Callable[[], object]], repeat: int = 10, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each contender over ``repeat`` interleaved rounds, after warm-up."""
    return {name: statistics.median(t) for name, t in rounds_ms(contenders, repeat, warmup).items()}


def rounds_ms(contenders: dict[str, Callable[[], object]], repeat: int = 10, warmup: int = 3,
              settle_s: Mapping[str, float] | None = None) -> dict[str, list[float]]:
    """Milliseconds of each contender's call in each of ``repeat`` interleaved rounds, after warm-up.

    ``settle_s`` names contenders after whose every call the loop sleeps (untimed) that many seconds
    before the next call starts: a runtime whose threads keep spinning after it returns (ONNX Runtime's
    do for ~30 ms) would otherwise slow whatever is timed right after it.
    """
    settle = dict(settle_s or {})
    for name, fn in contenders.items():
        for _ in range(warmup):
            fn()
            if name in settle:
                time.sleep(settle[name])
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            if name in settle:
                time.sleep(settle[name])
    return {name: [x * 1e3 for x in t] for name, t in times.items()}


def paired_speedup(baseline: list[float], contender: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios baseline/contender (> 1: the contender is faster).

    Each round ran both back to back, so a ratio per round cancels what drifts
    between rounds (clock, other load); its quartiles show how stable it is.
    """
    ratios = sorted(b / c for b, c in zip(baseline, contender, strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return median, q1, q3


# CPU features that decide which kernels are fast here (GEMMs in bf16 / int8 above all).
_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def machine() -> str:
    """The CPU model, its kernel-relevant flags and the core count, for every benchmark's output:
    numbers differ between machines, and a reader must know which one printed them."""
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [f for f in _FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none of ' + ' '.join(_FLAGS)}"
