"""Each tvm-vm call sizes the calling thread's TVM pool (tvm_vm._size_tvm_pool).

TVM's pool and PyTorch's OpenMP threads both spin while waiting, so kiln never runs both multi-threaded: when
a program runs PyTorch on one thread (``CompileOptions.intra_op_threads=1``) of a caller that has more, TVM's
pool takes the caller's count; otherwise it runs one thread, so a caller that set PyTorch to one thread gets one
thread in all, and so does a call :class:`~kiln.runtime.AdaptiveThreads` backed off to one thread (the other
cores are busy). ``TVM_NUM_THREADS`` set by the user is left alone. Results stay within fp32 rounding of eager.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import kiln

CODE = """
import torch, kiln
from safetensors.torch import load_file
from kiln.runtime.kernels import tvm_vm
io = load_file({io!r})
models = {{"one": kiln.load({one!r}), "default": kiln.load({default!r})}}
seen = []
for caller, name in ((2, "one"), (2, "default"), (1, "one"), (2, "one")):
    torch.set_num_threads(caller)
    torch.testing.assert_close(models[name](io["x"]), io["want"])
    assert torch.get_num_threads() == caller  # restored after the call
    seen.append(getattr(tvm_vm._pool, "threads", None))
print(seen)
"""


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.LayerNorm(256)).eval()
    x = torch.randn(4, 64)
    tmp = tmp_path_factory.mktemp("pool")
    one = kiln.compile(m, (x,), options=kiln.CompileOptions(intra_op_threads=1)).save(tmp / "one")
    default = kiln.compile(m, (x,)).save(tmp / "default")
    with torch.no_grad():
        save_file({"x": x, "want": m(x)}, tmp / "io.safetensors")
    return {"io": str(tmp / "io.safetensors"), "one": str(one), "default": str(default)}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_tvm_pool_takes_the_callers_threads_only_when_the_program_runs_pytorch_on_one(fresh_python, paths):
    assert fresh_python(CODE.format(**paths)).strip() == "[2, 1, 1, 2]"


def test_tvm_num_threads_set_by_the_user_is_left_alone(fresh_python, paths):
    out = fresh_python("import os\nos.environ['TVM_NUM_THREADS'] = '1'\n" + CODE.format(**paths))
    assert out.strip() == "[None, None, None, None]"


ADAPTIVE = """
import torch, kiln
from safetensors.torch import load_file
from kiln.runtime import threads
from kiln.runtime.kernels import tvm_vm
io = load_file({io!r})
model = kiln.load({default!r})
model.threads = threads.AdaptiveThreads()
model.threads.backed_off = True  # as after a slow call: the next calls run PyTorch on one thread
torch.set_num_threads(2)
torch.testing.assert_close(model(io["x"]), io["want"])
print(getattr(tvm_vm._pool, "threads", None))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_adaptive_threads_backing_off_gives_tvm_one_thread_too(fresh_python, paths):
    assert fresh_python(ADAPTIVE.format(**paths)).strip() == "1"
