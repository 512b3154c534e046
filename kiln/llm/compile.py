"""The compile side of an LLM: :func:`compile_llm` builds one artifact of prefill and decode programs.

``compile_llm(model)`` wraps a transformers causal LM (Llama, Qwen2, Mixtral,
GPT-2) in :class:`kiln.llm.hf.KVCacheLM` and compiles it with
``kiln.compile`` once per prompt-length bucket (prefill) and once for a single
token (decode), then packs them as ONE artifact whose programs are
``prefill_<bucket>`` and ``decode`` over one weight store (every tensor stored
once: the weights are the model's own in every program), each declaring the
run-time control ``start_pos`` with the positions it allows. The conventions
(cache layout, bucket policy) are :mod:`kiln.llm.runtime`'s, which runs it.

This module imports the compiler (``kiln.api``) and, through
:mod:`kiln.llm.hf`, transformers; the runtime never imports it.
"""
from __future__ import annotations

import torch

from ..api import compile as kiln_compile
from ..errors import KilnError
from ..runtime import CompiledModel
from ..runtime.artifact import declare_control, merge_programs
from .hf import KVCacheLM
from .runtime import DECODE, START_POS, CompiledLLM


def compile_llm(model: torch.nn.Module, *, batch: int = 1, prefill_buckets=(32, 128), capacity: int = 256,
                target: str = "cpu", options=None) -> CompiledLLM:
    """Compile a transformers causal LM into one artifact: prefill programs (one per bucket) and a decode program.

    ``options`` (a ``kiln.CompileOptions``) applies to every graph; the shapes
    are static, so ``options.dynamic_shapes`` must be unset.
    """
    buckets = sorted(set(prefill_buckets))
    if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
        raise KilnError(f"prefill_buckets must be positive ints; got {prefill_buckets!r}")
    if not isinstance(batch, int) or batch < 1:
        raise KilnError(f"batch must be a positive int; got {batch!r}")
    if buckets[-1] > capacity:
        raise KilnError(f"the largest prefill bucket ({buckets[-1]}) exceeds the cache capacity ({capacity})")
    if options is not None and getattr(options, "dynamic_shapes", None) is not None:
        raise KilnError("compile_llm compiles one static graph per bucket; leave options.dynamic_shapes unset")
    lm = KVCacheLM(model)
    k, v = lm.empty_cache(batch, capacity)

    def compile_for(length: int, name: str):
        ids = torch.zeros(batch, length, dtype=torch.int64)
        artifact = kiln_compile(lm, (ids, torch.tensor(0), k, v), target=target, options=options).artifact
        (program,) = artifact.manifest["programs"].values()
        first = 0 if length == 1 else 1 - length  # a prompt of one token, left-padded to the bucket
        declare_control(program, START_POS, default=first, min=first, max=capacity - length)
        return name, artifact

    parts = dict([compile_for(b, f"prefill_{b}") for b in buckets] + [compile_for(1, DECODE)])
    index = {"prefill": {str(b): f"prefill_{b}" for b in buckets}, "decode": DECODE}
    return CompiledLLM(CompiledModel(merge_programs(parts, default_program=DECODE, llm=index)))
