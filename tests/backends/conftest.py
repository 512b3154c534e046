"""Fixtures of the backend tests."""
from __future__ import annotations

import pytest

from kiln.runtime.kernels import tvm_dispatch


@pytest.fixture
def fallbacks(monkeypatch):
    """The calls the cpu target's attention kernels make to eager's attention (``kiln.sdpa_*_fallback``), recorded."""
    tvm_dispatch.register()
    calls = []
    real = tvm_dispatch._attention
    monkeypatch.setattr(tvm_dispatch, "_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls
