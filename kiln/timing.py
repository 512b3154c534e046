"""Wall-clock comparison of callables, interleaved so machine load hits them all alike.

Used by the demo, ``benchmarks/`` and ``kiln run``; never by tests (a test
asserts behaviour, not time).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(contenders: dict[str, Callable[[], object]], repeat: int = 10, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each contender over ``repeat`` interleaved rounds, after warm-up."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
