"""Suite-wide settings: graph verification on, offline HF, the slow / CUDA markers, and a check that no test
leaves PyTorch's process-wide settings changed for the tests after it."""
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


def _process_settings() -> dict:
    return {"torch.get_num_threads()": torch.get_num_threads(), "torch.get_default_dtype()": torch.get_default_dtype(),
            "torch.is_grad_enabled()": torch.is_grad_enabled(),
            "torch.backends.mkldnn.matmul.fp32_precision": torch.backends.mkldnn.matmul.fp32_precision}


@pytest.fixture(autouse=True)
def _process_settings_unchanged():
    """A test that changes PyTorch's thread count (kiln's runtime included, which must restore the caller's) or
    another process-wide setting fails, and the setting is put back: a later test's results (GEMM summation
    orders, TVM's pool size) would otherwise depend on which tests ran before it."""
    before = _process_settings()
    yield
    after = _process_settings()
    if after != before:
        torch.set_num_threads(before["torch.get_num_threads()"])
        torch.set_default_dtype(before["torch.get_default_dtype()"])
        torch.set_grad_enabled(before["torch.is_grad_enabled()"])
        torch.backends.mkldnn.matmul.fp32_precision = before["torch.backends.mkldnn.matmul.fp32_precision"]
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"the test left process-wide settings changed (before, after): {changed}")


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
