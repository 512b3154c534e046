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

``schedule`` orders chained chunks out of order (``ScheduleBlocks``,
:mod:`kiln.passes.schedule_blocks`): the chunk program's tasks (on the
``npu`` target: int8 linears on ``npu0``, float attention, norms and outlier
paths on ``cpu0``) are ordered across their queues for every number of
chunks up to the capacity, so chunk *i+1*'s NPU work runs while the CPU
finishes chunk *i*; the costs are the target's device model's
(``"modeled"``) or this machine's timings of each task (``"measured"``, with
``queue_cores`` as the runtime will pin them). ``calibration_prompts``
(token-id tensors ``[batch, n]``) become every program's calibration set,
each sample the exact inputs that program sees for that prompt (its chunks
with the KV the earlier chunks wrote; a decode step after it), computed by
running the model eagerly.

This module imports the compiler (``kiln.api``) and, through
:mod:`kiln.llm.hf`, transformers; the runtime never imports it.
"""
from __future__ import annotations

import dataclasses

import torch

from ..api import compile as kiln_compile
from ..backends import target_backends
from ..errors import KilnError
from ..ir.meta import dtype_from_name
from ..passes import get_pipeline
from ..passes.chunk_prefill import ChunkPrefill, cache_input_names, output_names
from ..passes.schedule_blocks import schedule_chain
from ..runtime import CompiledModel
from ..runtime.artifact import declare_control, merge_programs
from ..runtime.chain import Chain, measure_tasks
from .hf import KVCacheLM, LayerwiseKVCacheLM
from .runtime import DECODE, START_POS, CompiledLLM, chunk_program_name, chunk_starts

SCHEDULES = ("modeled", "measured")

DEFAULT_BUCKETS = (32, 128)


def compile_llm(model: torch.nn.Module, *, batch: int = 1, prefill_buckets=None, chunk_size: int | None = None,
                capacity: int = 256, target: str = "cpu", options=None, schedule: str | None = None,
                queue_cores: dict | None = None, calibration_prompts=None) -> CompiledLLM:
    """Compile a transformers causal LM into one artifact: prefill programs and a decode program.

    Prefill is either bucketed (``prefill_buckets``, default ``(32, 128)``: one
    program per bucket, a prompt padded to the smallest that fits) or chunked
    (``chunk_size=C``: one program of ``C`` tokens run once per chunk, any
    prompt up to ``capacity``); give one or the other. ``options`` (a
    ``kiln.CompileOptions``) applies to every graph; the shapes are static, so
    ``options.dynamic_shapes`` must be unset, and calibration data comes from
    ``calibration_prompts`` (``options.calibration`` must be unset: each
    program takes other inputs). ``schedule`` (``"modeled"`` or
    ``"measured"``; chunked prefill only) adds ScheduleBlocks' out-of-order
    task orders to the chunk program; ``queue_cores`` (queue -> CPU cores)
    pins each queue's worker when measuring, and in the returned CompiledLLM.
    """
    if schedule is not None and schedule not in SCHEDULES:
        raise KilnError(f"schedule must be one of {SCHEDULES} or None, not {schedule!r}")
    if schedule is not None and chunk_size is None:
        raise KilnError("schedule orders the chunks of a chunked prefill; give chunk_size too")
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
    if options is not None and options.calibration is not None:
        raise KilnError("compile_llm compiles programs that take different inputs; give calibration_prompts "
                        "(token ids) instead of options.calibration")
    samples = _calibration(model, calibration_prompts, batch, capacity, chunk_size, buckets)

    def opts(program: str):
        if samples is None:
            return options
        from ..api import CompileOptions
        return dataclasses.replace(options or CompileOptions(), calibration=samples[program])

    common = dict(batch=batch, capacity=capacity, target=target)
    parts = {f"prefill_{b}": compile_program(model, b, options=opts(f"prefill_{b}"), **common) for b in buckets}
    index: dict = {"prefill": {str(b): f"prefill_{b}" for b in buckets}, "decode": DECODE}
    if chunk_size is not None:
        index["chunk"] = chunk_index(chunk_size, KVCacheLM(model).layers)
        parts[index["chunk"]["program"]] = compile_program(model, chunk_size, layerwise=True,
                                                           options=opts("chunk"), **common)
    parts[DECODE] = compile_program(model, 1, options=opts(DECODE), **common)
    artifact = merge_programs(parts, default_program=DECODE, llm=index)
    if schedule is not None:
        _schedule_chunks(artifact, index["chunk"], capacity, schedule, target, options, queue_cores)
    return CompiledLLM(CompiledModel(artifact), queue_cores=queue_cores)


def _schedule_chunks(artifact, chunk: dict, capacity: int, source: str, target: str, options,
                     queue_cores: dict | None) -> None:
    """Add ScheduleBlocks' ``chain`` field (orders for 1 .. ceil(capacity / C) chunks) to the chunk program."""
    program = artifact.manifest["programs"][chunk["program"]]
    outputs = chunk["outputs"]
    carry = {outputs.index(out): inp for out, inp in chunk["carry"].items()}
    max_steps = -(-capacity // chunk["size"])
    backends = target_backends(target, options)
    if source == "modeled":
        costs = {t["name"]: t["report"].get("modeled_us") for t in program["tasks"]}
        if any(c is None for c in costs.values()):
            raise KilnError(f"schedule='modeled' needs a device model that prices every task; target {target!r} "
                            "has none (target 'npu' has one), so use schedule='measured'")
        sync = next((us for b in backends if (us := b.modeled_handoff_us()) is not None), 0.0)
    else:
        costs = _measured_costs(artifact, chunk, carry, queue_cores)
        sync = 0.0  # a hand-off's cost is in the measured task times (the wait for an event)
    program["chain"] = schedule_chain(program, carry, max_steps, costs, cost_source=source, sync_us=sync)


def _measured_costs(artifact, chunk: dict, carry: dict, queue_cores: dict | None) -> dict[str, float]:
    """Each chunk-program task's median time here, in order over two chunks of a zero prompt."""
    program = CompiledModel(artifact).programs[chunk["program"]]
    runner = Chain(program, queue_cores=queue_cores, carry=carry)
    size = chunk["size"]
    batch = program.signature.inputs[0].type.shape[0]
    caches = [torch.zeros(i.type.shape, dtype=dtype_from_name(i.type.dtype)) for i in program.signature.inputs[1:]]
    steps = [[torch.zeros(batch, size, dtype=torch.int64), *caches],
             [torch.zeros(batch, size, dtype=torch.int64), *[None] * len(caches)]]
    return measure_tasks(runner, steps, [{START_POS: 0}, {START_POS: size}])


def _calibration(model, prompts, batch: int, capacity: int, chunk_size: int | None, buckets: list[int]):
    """Per program, the inputs it sees for each prompt (``None`` without prompts), from eager runs of the model."""
    if prompts is None:
        return None
    prompts = list(prompts)
    if not prompts:
        raise KilnError("calibration_prompts is empty")
    lm, layerwise = KVCacheLM(model), LayerwiseKVCacheLM(model)
    out: dict[str, list] = {DECODE: [], "chunk": [], **{f"prefill_{b}": [] for b in buckets}}
    with torch.no_grad():
        for j, ids in enumerate(prompts):
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != batch or ids.is_floating_point():
                raise KilnError(f"calibration_prompts[{j}] must be token ids [batch={batch}, n]; got "
                                f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
            n = ids.shape[1]
            if not 1 <= n < capacity:
                raise KilnError(f"calibration_prompts[{j}] has {n} tokens; it must have 1 .. {capacity - 1} "
                                "(one decode step follows it)")
            ids = ids.to(torch.int64)
            for b in buckets:
                if b >= n:
                    padded = torch.cat([torch.zeros(batch, b - n, dtype=torch.int64), ids], 1)
                    out[f"prefill_{b}"].append((padded, torch.tensor(n - b), *lm.empty_cache(batch, capacity)))
            k, v = lm.empty_cache(batch, capacity)
            logits, k, v = lm(ids, torch.tensor(0), k, v)  # the whole prompt at once: the cache decode sees
            out[DECODE].append((logits[:, -1].argmax(-1, keepdim=True), torch.tensor(n), k, v))
            if chunk_size is not None:
                starts = chunk_starts(n, chunk_size)
                padded = torch.cat([torch.zeros(batch, len(starts) * chunk_size - n, dtype=torch.int64), ids], 1)
                kl, vl = layerwise.empty_cache(batch, capacity)
                for i, start in enumerate(starts):
                    chunk = padded[:, i * chunk_size:(i + 1) * chunk_size]
                    out["chunk"].append((chunk, torch.tensor(start), kl, vl))
                    _, kl, vl = layerwise(chunk, torch.tensor(start), kl, vl)
    return out


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
