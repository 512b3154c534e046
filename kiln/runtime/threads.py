"""Intra-op threads that back off when another process takes a core (opt-in: ``model.threads = AdaptiveThreads()``).

PyTorch's OpenMP threads split every op's work evenly and meet at a barrier.
When another process keeps one of them from running, each op waits for that
thread's share, and spinning waiters take the time it needs: on a 2-core
machine with one core kept busy, eager BERT and kiln ran 5.7x and 6.6x their
quiet latency, against 1.8x for both on one thread (`benchmarks/shared_cpu.py`).

:class:`AdaptiveThreads` runs each call of a :class:`~kiln.runtime.CompiledModel`
with the calling thread's full intra-op thread count while calls take about
their best time, drops to one thread when a call takes ``slow`` times the
best seen at full width (another process is taking a core), and probes full
width again every ``probe_every`` calls, returning to it when the probe is
fast again. The thread count is the calling thread's own (OpenMP's is per
thread) and is restored after every call, so the policy touches nothing
outside kiln's calls.

Results at one and at several threads agree to fp32 rounding, not bitwise
(a reduction may split its sum differently), which is why this is opt-in:
a model without it gives bitwise the same result on every call.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator

import torch

from ..errors import KilnError


_outside = threading.local()  # .threads: the calling thread's PyTorch threads outside kiln's intra_op_threads


def caller_threads() -> int:
    """The threads the calling thread's work may use: its PyTorch intra-op threads outside kiln's
    :func:`intra_op_threads` blocks (what its user gave it), unless the outermost block did not lend them. Inside
    a block that dropped PyTorch to one thread, the TVM kernels take this many (``tvm_vm``)."""
    return getattr(_outside, "threads", None) or torch.get_num_threads()


@contextlib.contextmanager
def intra_op_threads(n: int | None, lend: bool = True) -> Iterator[None]:
    """The calling thread's PyTorch intra-op threads set to ``n`` inside the block (None: as they are), restored
    after. ``lend``: the threads PyTorch gives up may run TVM's kernels instead (a program's own
    ``intra_op_threads``); False when they were given up because the cores are busy (:class:`AdaptiveThreads`)."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    outermost = getattr(_outside, "threads", None) is None
    if outermost:
        _outside.threads = previous if lend else n
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if outermost:
            _outside.threads = None


class AdaptiveThreads:
    """Full intra-op threads while calls run at their best time; one while another process takes a core."""

    def __init__(self, threads: int | None = None, slow: float = 1.5, probe_every: int = 16):
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise KilnError(f"AdaptiveThreads(threads=...) must be a positive int or None; got {threads!r}")
        if not slow > 1:
            raise KilnError(f"AdaptiveThreads(slow=...) must be > 1; got {slow!r}")
        if not isinstance(probe_every, int) or probe_every < 1:
            raise KilnError(f"AdaptiveThreads(probe_every=...) must be a positive int; got {probe_every!r}")
        self.threads = threads
        self.slow = slow
        self.probe_every = probe_every
        self.best = math.inf  # the fastest call seen at full width, in seconds
        self.backed_off = False
        self._since_probe = 0
        self._lock = threading.Lock()

    def choose(self, full: int) -> int:
        """The thread count for the next call, ``full`` being the calling thread's own."""
        with self._lock:
            if not self.backed_off:
                return full
            self._since_probe += 1
            if self._since_probe >= self.probe_every:
                self._since_probe = 0
                return full  # a probe: is the machine free again?
            return 1

    def record(self, threads: int, full: int, seconds: float) -> None:
        """What a call at ``threads`` took; a call at full width moves the policy."""
        if threads != full or full == 1:
            return
        with self._lock:
            contended = seconds > self.slow * self.best
            self.best = min(self.best, seconds)
            self.backed_off = contended
            self._since_probe = 0

    @contextlib.contextmanager
    def call(self) -> Iterator[int]:
        """Run the block (one call) at the chosen thread count; the calling thread's count is restored after."""
        full = self.threads or torch.get_num_threads()
        n = self.choose(full)
        start = time.perf_counter()
        try:
            with intra_op_threads(n, lend=False):  # backed off: the other cores are taken, TVM's kernels too
                yield n
        finally:
            self.record(n, full, time.perf_counter() - start)

    def __repr__(self) -> str:
        state = "backed off to 1 thread" if self.backed_off else "full width"
        return f"<kiln AdaptiveThreads {state}, best {self.best * 1e3:.2f} ms, slow={self.slow}>"
