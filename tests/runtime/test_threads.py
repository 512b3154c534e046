"""One CompiledModel called from several threads at once matches eager on every call.

Serving code calls one model from a pool of threads. A TVM ``relax.VirtualMachine``
keeps each call's frames and registers in itself and runs with the GIL released,
so before each thread had its own VM, 4 threads x 200 calls on a ``cpu`` model
segfaulted (``StorageObj::AllocTensor``) and 2 threads mixed up registers.
"""
import threading

import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

import kiln
from kiln.runtime.executor import CompiledModel

THREADS, CALLS, INPUTS_PER_THREAD = 4, 200, 4


class Block(nn.Module):
    """GEMMs (library dispatch), fused TIR ops (norm, GELU, adds) and attention: every kind of kernel a call runs."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(x)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Block().eval()


@pytest.fixture(scope="module")
def compiled(model):
    """The model compiled for each target, once for the module."""
    cms = {t: kiln.compile(model, (torch.randn(2, 8, 32),), target=t) for t in ("cpu", "torch")}
    # The point is the TVM VM: the cpu model must not have fallen back to torch.
    assert [p["format"] for p in cms["cpu"].manifest["partitions"]] == ["tvm-vm"]
    return cms


@pytest.mark.parametrize("target", ["cpu", "torch"])
def test_concurrent_calls_match_eager(model, compiled, target):
    cm = compiled[target]
    gen = torch.Generator().manual_seed(1)
    inputs = [[torch.randn(2, 8, 32, generator=gen) for _ in range(INPUTS_PER_THREAD)] for _ in range(THREADS)]
    with torch.no_grad():
        expected = [[model(x) for x in xs] for xs in inputs]
    outputs = [[] for _ in range(THREADS)]
    failures = []
    start = threading.Barrier(THREADS)

    def work(t):
        try:
            start.wait()
            for i in range(CALLS):
                j = i % INPUTS_PER_THREAD
                out = cm(inputs[t][j])
                torch.testing.assert_close(out, expected[t][j])
                outputs[t].append((j, out))
        except Exception as e:  # reported below, with the thread it happened in
            failures.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, "\n".join(failures[:3])
    # Outputs handed out stay the caller's: no later call, on any thread, wrote into them.
    for t in range(THREADS):
        assert len(outputs[t]) == CALLS
        for j, out in outputs[t]:
            torch.testing.assert_close(out, expected[t][j])


def test_loading_a_model_leaves_tvm_functions_alone(compiled, monkeypatch):
    """TVM's global function table has no lock, and a thread making its VM reads it:
    a load on another thread must not rewrite it (the dispatch functions are registered once)."""
    rewrites = []
    monkeypatch.setattr(tvm, "register_global_func", lambda *args, **kwargs: rewrites.append(args[0]))
    loaded = CompiledModel(compiled["cpu"].artifact)  # loads the tvm-vm kernel again
    assert rewrites == []
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(loaded(x), compiled["cpu"](x))
