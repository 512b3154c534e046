"""Each tvm-vm call sizes the calling thread's TVM pool by PyTorch's intra-op threads (tvm_vm._size_tvm_pool).

TVM's pool and PyTorch's OpenMP threads both spin while waiting, so kiln never runs both multi-threaded: every
core of the process for TVM while PyTorch runs one thread, one TVM thread otherwise; ``TVM_NUM_THREADS`` set by
the user is left alone. Results stay within fp32 rounding of eager at either size.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import kiln

CODE = """
import os, torch, kiln
from safetensors.torch import load_file
from kiln.runtime.kernels import tvm_vm
io = load_file({io!r})
cm = kiln.load({art!r})
seen = []
for threads in (1, 2, 1):
    torch.set_num_threads(threads)
    torch.testing.assert_close(cm(io["x"]), io["want"])
    seen.append(getattr(tvm_vm._pool, "threads", None))
print(seen, len(os.sched_getaffinity(0)))
"""


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.LayerNorm(256)).eval()
    x = torch.randn(4, 64)
    tmp = tmp_path_factory.mktemp("pool")
    art = kiln.compile(m, (x,)).save(tmp / "art")
    with torch.no_grad():
        save_file({"x": x, "want": m(x)}, tmp / "io.safetensors")
    return CODE.format(io=str(tmp / "io.safetensors"), art=str(art))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_tvm_pool_takes_every_core_only_while_pytorch_runs_one_thread(fresh_python, code):
    seen, cores = fresh_python(code).strip().rsplit(" ", 1)
    assert seen == str([int(cores), 1, int(cores)])


def test_tvm_num_threads_set_by_the_user_is_left_alone(fresh_python, code):
    out = fresh_python("import os\nos.environ['TVM_NUM_THREADS'] = '1'\n" + code)
    assert out.startswith("[None, None, None]")
