"""Shared by the packed-weight tests: a saved artifact, loaded in a fresh process, runs on its packed weights."""
from __future__ import annotations

from safetensors.torch import save_file

_FRESH_LOAD = """
import torch, kiln
from safetensors.torch import load_file
from kiln.runtime.kernels import tvm_dispatch
io = load_file({io!r})
model = kiln.load({art!r})
used = []
real = tvm_dispatch._packed
tvm_dispatch._packed = lambda w, layout: used.append(real(w, layout)) or used[-1]
out = model(io["x"])
assert len(used) == {count} and all(u is not None for u in used), used
assert torch.equal(out, io["got"]), (out - io["got"]).abs().max()
print("ok")
"""


def check_packed_after_fresh_load(fresh_python, cm, x, got, tmp_path, count: int) -> None:
    """Save ``cm``; a fresh process loads it, its ``count`` linears find their packed weights, and ``cm(x)`` there
    is bitwise ``got``."""
    art = cm.save(tmp_path / "art")
    save_file({"x": x, "got": got}, tmp_path / "io.safetensors")
    out = fresh_python(_FRESH_LOAD.format(io=str(tmp_path / "io.safetensors"), art=str(art), count=count))
    assert out.strip() == "ok"
