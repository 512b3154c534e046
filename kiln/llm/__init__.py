"""LLMs: prefill and decode programs with the KV cache passed in and out as tensors, and greedy generation.

Three modules, split by what they may import:

- :mod:`kiln.llm.runtime`: :class:`CompiledLLM` (prefill with the bucket
  or chunk policy, decode, ``generate``, the KV cache as tensors) and :func:`load`.
  The runtime only: ``kiln.load`` uses it for an LLM artifact.
- :mod:`kiln.llm.compile`: :func:`compile_llm`, which compiles a transformers
  causal LM into one such artifact; imports the compiler (``kiln.api``).
- :mod:`kiln.llm.hf`: :class:`KVCacheLM`, the transformers causal LM wrapped
  as ``(input_ids, start_pos, k_cache, v_cache) -> (logits, k, v)`` for
  tracing, and :class:`LayerwiseKVCacheLM`, the same with one cache tensor
  per layer (chunked prefill's chunk program); imports transformers.

The names below are imported on first use, so ``import kiln.llm`` imports
none of the three, and loading or running an LLM artifact imports
:mod:`kiln.llm.runtime` alone.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CompiledLLM": "runtime",
    "load": "runtime",
    "DECODE": "runtime",
    "START_POS": "runtime",
    "compile_llm": "compile",
    "KVCacheLM": "hf",
    "LayerwiseKVCacheLM": "hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln.llm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
