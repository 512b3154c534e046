"""The runtime loads and runs artifacts without the compiler, in a fresh process, never unpickling."""
import subprocess
import sys

import torch
from safetensors.torch import save_file
from torch import nn

import kiln


def test_runtime_imports_without_passes():
    code = "import sys, kiln.runtime; bad = [m for m in sys.modules if m.startswith(('kiln.passes', 'kiln.api', " \
           "'kiln.backends', 'kiln.ir.tracing'))]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fresh_process_loads_and_matches_eager_without_compiler_or_pickle(tmp_path, fresh_python):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 3)).eval()
    x = torch.randn(4, 6)
    kiln.compile(m, (x,)).save(tmp_path / "art")
    save_file({"x": x, "expected": m(x).detach()}, str(tmp_path / "io.safetensors"))
    out = fresh_python(f"""
        import sys
        import kiln
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / 'io.safetensors')!r})
        cm = kiln.load({str(tmp_path / 'art')!r})
        torch.testing.assert_close(cm(io["x"]), io["expected"])
        leaked = [m for m in sys.modules if m.startswith(("kiln.passes", "kiln.api", "kiln.ir.tracing"))]
        assert not leaked, leaked
        print("ok")
    """)
    assert out.strip() == "ok"
