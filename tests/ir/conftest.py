"""Fixtures for IR tests: zoo models exported once per session."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import pytest
import torch

from kiln import zoo
from kiln.ir.moe import experts_as_kiln_ops


class Exported(NamedTuple):
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    gm: torch.fx.GraphModule


@contextlib.contextmanager
def _kv_cache_off(model: torch.nn.Module):
    # Causal LMs would return a cache object from a whole-sequence forward;
    # kiln's tracer exports them with the cache off, and so do these tests.
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    saved, config.use_cache = config.use_cache, False
    try:
        yield
    finally:
        config.use_cache = saved


def _export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    # The graph kiln's tracer works on: torch.export, then functionalised without decomposing ops.
    # HF MoE experts run as kiln::moe_experts, as kiln's tracer has them.
    with _kv_cache_off(model), experts_as_kiln_ops(model):
        return torch.export.export(model, inputs).run_decompositions({}).graph_module


@pytest.fixture(scope="session")
def export():
    """``export(model, inputs)`` gives the graph module kiln's tracer would see (KV cache off)."""
    return _export


@pytest.fixture(scope="session")
def exported():
    """``exported(name)`` builds zoo model ``name`` with its defaults and exports it, once per session.

    The graph is shared between tests: treat it as read-only.
    """
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            model, inputs = zoo.MODELS[name]()
            cache[name] = Exported(model, inputs, _export(model, inputs))
        return cache[name]

    return get
