"""Suite-wide settings: graph verification on, offline HF, and the slow / CUDA markers."""
import os

os.environ.setdefault("KILN_VERIFY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "requires_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


_NO_PICKLE = """
import pickle
def _refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle")
pickle.load = pickle.loads = pickle.Unpickler = _refuse
import torch
torch.load = _refuse
"""


@pytest.fixture
def fresh_python():
    """Run Python source in a new interpreter where unpickling fails; returns its stdout."""
    import subprocess
    import sys
    import textwrap

    def run(code: str) -> str:
        out = subprocess.run([sys.executable, "-c", _NO_PICKLE + textwrap.dedent(code)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout
    return run
