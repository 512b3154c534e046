"""The compile side of an LLM: :func:`compile_llm` builds one artifact of prefill and decode programs.

``compile_llm(model)`` wraps a transformers causal LM (Llama, Qwen2, Mixtral,
GPT-2) in :class:`kiln.llm.hf.KVCacheLM` and compiles it with
``kiln.compile`` once per prompt-length bucket (prefill) and once for a single
token (decode), then packs them as ONE artifact whose programs are
``prefill_<bucket>`` and ``decode`` over one weight store (every tensor stored
once: the weights are the model's own in every program), each declaring the
run-time control ``start_pos`` with the positions it allows.

``compile_llm(model, chunk_size=C)`` replaces the buckets by one chunk
program ``prefill_chunk_<C>``, traced from
:class:`kiln.llm.hf.LayerwiseKVCacheLM` (one cache tensor per layer in and
out) and checked by the ``chunk_prefill`` pass (static, ``C`` tokens, no op
joining the layers' caches); the runtime runs a prompt of any length up to
the capacity as ``ceil(n / C)`` calls of it. The manifest's ``llm`` index
names it and its carried state (which output feeds which input of the next
chunk). The conventions (cache layout, bucket and chunk policy) are
:mod:`kiln.llm.runtime`'s, which runs it.

This module imports the compiler (``kiln.api``) and, through
:mod:`kiln.llm.hf`, transformers; the runtime never imports it.
"""
from __future__ import annotations

import torch

from ..api import compile as kiln_compile
from ..errors import KilnError
from ..passes import get_pipeline
from ..passes.chunk_prefill import ChunkPrefill, cache_input_names, output_names
from ..runtime import CompiledModel
from ..runtime.artifact import declare_control, merge_programs
from .hf import KVCacheLM, LayerwiseKVCacheLM
from .runtime import DECODE, START_POS, CompiledLLM, chunk_program_name

DEFAULT_BUCKETS = (32, 128)


def compile_llm(model: torch.nn.Module, *, batch: int = 1, prefill_buckets=None, chunk_size: int | None = None,
                capacity: int = 256, target: str = "cpu", options=None) -> CompiledLLM:
    """Compile a transformers causal LM into one artifact: prefill programs and a decode program.

    Prefill is either bucketed (``prefill_buckets``, default ``(32, 128)``: one
    program per bucket, a prompt padded to the smallest that fits) or chunked
    (``chunk_size=C``: one program of ``C`` tokens run once per chunk, any
    prompt up to ``capacity``); give one or the other. ``options`` (a
    ``kiln.CompileOptions``) applies to every graph; the shapes are static, so
    ``options.dynamic_shapes`` must be unset.
    """
    if chunk_size is not None and prefill_buckets is not None:
        raise KilnError("compile_llm: give prefill_buckets or chunk_size, not both (chunked prefill serves every "
                        "prompt length with one program)")
    if not isinstance(batch, int) or batch < 1:
        raise KilnError(f"batch must be a positive int; got {batch!r}")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise KilnError(f"capacity must be a positive int; got {capacity!r}")
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise KilnError(f"chunk_size must be a positive int; got {chunk_size!r}")
        if chunk_size > capacity:
            raise KilnError(f"chunk_size ({chunk_size}) exceeds the cache capacity ({capacity})")
        buckets = []
    else:
        buckets = sorted(set(DEFAULT_BUCKETS if prefill_buckets is None else prefill_buckets))
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise KilnError(f"prefill_buckets must be positive ints; got {prefill_buckets!r}")
        if buckets[-1] > capacity:
            raise KilnError(f"the largest prefill bucket ({buckets[-1]}) exceeds the cache capacity ({capacity})")
    if options is not None and getattr(options, "dynamic_shapes", None) is not None:
        raise KilnError("compile_llm compiles one static graph per bucket; leave options.dynamic_shapes unset")
    common = dict(batch=batch, capacity=capacity, target=target, options=options)
    parts = {f"prefill_{b}": compile_program(model, b, **common) for b in buckets}
    index: dict = {"prefill": {str(b): f"prefill_{b}" for b in buckets}, "decode": DECODE}
    if chunk_size is not None:
        index["chunk"] = chunk_index(chunk_size, KVCacheLM(model).layers)
        parts[index["chunk"]["program"]] = compile_program(model, chunk_size, layerwise=True, **common)
    parts[DECODE] = compile_program(model, 1, **common)
    return CompiledLLM(CompiledModel(merge_programs(parts, default_program=DECODE, llm=index)))


def compile_program(model: torch.nn.Module, length: int, *, layerwise: bool = False, batch: int = 1,
                    capacity: int = 256, target: str = "cpu", options=None):
    """One LLM program of ``length`` tokens as a one-program artifact, ``start_pos`` its control.

    ``layerwise=False``: :class:`KVCacheLM` (a prefill bucket, or decode for
    ``length`` 1); ``True``: the chunk program, :class:`LayerwiseKVCacheLM`
    with the ``chunk_prefill`` check after ``annotate_regions``. What
    :func:`compile_llm` merges; public for tools that time one program's build.
    """
    lm = LayerwiseKVCacheLM(model) if layerwise else KVCacheLM(model)
    k, v = lm.empty_cache(batch, capacity)
    passes = None
    if layerwise:
        pipeline = get_pipeline((options.pipeline if options is not None else None) or target)
        if "annotate_regions" not in pipeline:
            raise KilnError(f"compile_llm(chunk_size=...): the pipeline ({pipeline}) has no annotate_regions, which "
                            "the chunk_prefill check needs")
        at = pipeline.index("annotate_regions") + 1
        passes = [*pipeline[:at], ChunkPrefill(chunk_size=length, layers=lm.layers), *pipeline[at:]]
    ids = torch.zeros(batch, length, dtype=torch.int64)
    artifact = kiln_compile(lm, (ids, torch.tensor(0), k, v), target=target, passes=passes, options=options).artifact
    (program,) = artifact.manifest["programs"].values()
    first = 0 if length == 1 else 1 - length  # a prompt of one token, left-padded to the bucket or chunk
    declare_control(program, START_POS, default=first, min=first, max=capacity - length)
    return artifact


def chunk_index(chunk_size: int, layers: int) -> dict:
    """The ``llm`` index's ``chunk`` entry: the program's name, its flat outputs' names, and the carried state."""
    outputs = output_names(layers)
    return {"size": chunk_size, "program": chunk_program_name(chunk_size), "outputs": outputs,
            "carry": dict(zip(outputs[1:], cache_input_names(layers)))}
