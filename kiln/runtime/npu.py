"""The emulated NPU's counters: graph builds, build-cache hits, calls, and their modeled times.

A mobile NPU (Qualcomm HTP through QNN) runs a graph only after building
(and finalizing) it for one set of static input shapes, which takes
hundreds of milliseconds to seconds (``kiln/backends/npu/cost.py``). The
``npu-emulated`` kernels (``kiln/runtime/kernels/npu_emulated.py``) keep one
process-wide build cache keyed by ``(graph digest, input shapes)``: the first
call of a key counts one build and its modeled build time, later calls are
hits. Each call also adds its task's modeled execute time. The emulator
computes on this CPU; only the counts are real, every time here is *modeled*
(the cost model's device time, not a measurement), and the key names say so.

The cache holds keys only: each loaded kernel computes with its own bound
weights, so a hit can never make one model run with another's graph; it
models a device whose built graphs (QNN context binaries) outlive one load.

    kiln.runtime.npu.reset()
    model(x); model(x)
    kiln.runtime.npu.stats()  # {"builds": 1, "cache_hits": 1, "calls": 2, "modeled_build_us": ..., ...}
    print(kiln.runtime.npu.summary())

Thread-safe: the executor may run a program's queues in several threads.
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_built: set[tuple] = set()
_counts: dict[str, float] = {}


def _zero() -> None:
    _counts.update(builds=0, cache_hits=0, calls=0, modeled_build_us=0.0, modeled_execute_us=0.0)


_zero()


def record_call(key: tuple, build_us: float, execute_us: float) -> bool:
    """Count one call of the graph ``key`` (digest, input shapes); True when it had to be built first."""
    with _lock:
        built = key not in _built
        if built:
            _built.add(key)
            _counts["builds"] += 1
            _counts["modeled_build_us"] += build_us
        else:
            _counts["cache_hits"] += 1
        _counts["calls"] += 1
        _counts["modeled_execute_us"] += execute_us
        return built


def stats() -> dict:
    """The counters since the last :func:`reset`; ``graphs``: distinct (digest, shapes) keys built."""
    with _lock:
        out = {k: (int(v) if k in ("builds", "cache_hits", "calls") else float(v)) for k, v in _counts.items()}
        out["graphs"] = len(_built)
        return out


def reset() -> None:
    """Zero the counters and empty the build cache (the next call of every graph builds it again)."""
    with _lock:
        _built.clear()
        _zero()


def _time(us: float) -> str:
    return f"{us / 1e6:.3g} s" if us >= 1e6 else f"{us / 1e3:.3g} ms" if us >= 1e3 else f"{us:.3g} us"


def summary() -> str:
    """One line for people: counts, and the modeled times labeled as modeled."""
    s = stats()
    return (f"npu (emulated): {s['calls']} calls, {s['builds']} graph builds (modeled {_time(s['modeled_build_us'])}), "
            f"{s['cache_hits']} build-cache hits, modeled execute {_time(s['modeled_execute_us'])}")
