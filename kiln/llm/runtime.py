"""The runtime side of an LLM: :class:`CompiledLLM` runs compiled prefill and decode programs, the KV cache as tensors.

An LLM artifact (written by :func:`kiln.llm.compile.compile_llm`) holds the
programs ``prefill_<bucket>`` (one per prompt-length bucket), or one chunk
program ``prefill_chunk_<C>``, and ``decode`` over one weight store; its
manifest's ``llm`` field names them. ``kiln.load``
(or :func:`load`) returns a :class:`CompiledLLM` for it, which runs them for
greedy generation.

Every program is ``(input_ids, k_cache, v_cache) -> (logits, k_cache_new,
v_cache_new)`` with the run-time control ``start_pos``, ``logits`` being the
last position's only (``[batch, 1, vocab]``):

- Cache layout: ``k_cache`` and ``v_cache`` are ``[layers, batch, kv_heads,
  capacity, head_dim]`` in the model's dtype; slot ``j`` holds the token at
  position ``j``. The programs never write in place: the updated cache is an
  output (backends such as TVM drop in-place buffer updates).
- ``start_pos``, the position of ``input_ids[:, 0]``, is a control (a 0-d
  int64 input the runtime feeds): decode allows ``0 .. capacity-1``, the
  prefill of bucket ``b`` ``1-b .. capacity-b``. One decode program serves every step.
- Attention covers the whole capacity with a mask allowing slot ``j`` for the
  query at position ``p`` iff ``j <= p``.

Bucket policy: a prompt of ``n`` tokens is left-padded (with token 0) to the
smallest bucket ``>= n`` and prefilled at ``start_pos = n - bucket``, so its
tokens sit at positions ``0 .. n-1`` and its last token is the program's last
row, whose logits give the first new token; decoding continues at position
``n``. The padding's positions are negative: its keys and values are written
to no slot, and no real query's mask lets it through, so it never affects a
result. A generation of ``m`` tokens needs ``n + m <= capacity``.

Chunked prefill (``compile_llm(..., chunk_size=C)``, the ``llm`` index's
``chunk`` field): one static program of ``C`` tokens, ``(input_ids [batch,
C], k_cache_0 ... k_cache_{L-1}, v_cache_0 ...) -> (logits, k_new_0 ...
k_new_{L-1}, v_new_0 ...)`` with the control ``start_pos`` (``1-C ..
capacity-C``), each cache one layer's ``[batch, kv_heads, capacity,
head_dim]``. The index's ``outputs`` names the flat outputs, and ``carry``
says which output feeds which input of the next chunk (``{"k_new_l":
"k_cache_l", "v_new_l": "v_cache_l"}``), so a runtime chains chunks without
knowing the model. A prompt of ``n <= capacity`` tokens runs as ``k =
ceil(n/C)`` chunks: it is left-padded (token 0) to ``k*C`` and chunk ``i``
runs at ``start_pos = n - k*C + i*C``. The padding (``k*C - n <= C-1``
tokens) is all in the first chunk, at negative positions, as the bucket
policy's is: written to no slot and masked for every real query, so it costs
nothing but its rows and never changes a result; every real token sits at
its own position, and chunk ``i`` attends to the slots earlier chunks wrote
plus the causal part of itself (the mask ``j <= p``). The last chunk's last
row is the prompt's last token, so its logits are the ones returned, and
every chunk computes the LM head for one row only (``prune_rows``). Right
padding of the last chunk would need neither negative positions nor a clamp,
but its padding would be written to cache slots past ``n`` (harmless but not
free), the logits to return would sit at a row that depends on ``n`` (so the
LM head on every row, or a run-time row index), and the last chunk would need
``ceil(n/C)*C <= capacity``. Chunking replaces the buckets: an artifact has
one or the other (one program serves every prompt length, which is the
point). ``prefill`` returns the stacked cache that decode takes
(``torch.stack`` of the last chunk's per-layer outputs, one copy); the
chunks take per-layer views of it in turn (``unbind``: no copy).

Not handled: prompts of different lengths in one batch (every row is padded
by the same amount), sampling (greedy only), stopping at an end-of-sequence token,
sliding-window attention.

This module imports the runtime only: never the compiler (``kiln.api``,
``kiln.passes``, ``kiln.backends``), transformers or :mod:`kiln.zoo`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import ArtifactError, InputMismatchError, KilnError
from ..ir.meta import dtype_from_name
from ..runtime import CompiledModel, read_artifact
from ..runtime.artifact import REBUILD
from ..runtime.chain import IN_ORDER, SCHEDULED, Chain
from ..runtime.executor import Program

DECODE = "decode"  # the decode program's name; a prefill program is prefill_<bucket> or prefill_chunk_<C>
OLD_INDEX = "llm.json"  # what kiln 0.1 saved an LLM as: a directory of artifacts, one per graph
_INPUTS = ("input_ids", "k_cache", "v_cache")
START_POS = "start_pos"  # the run-time control every LLM program takes


def chunk_program_name(chunk_size: int) -> str:
    return f"prefill_chunk_{chunk_size}"


def chunk_starts(n: int, chunk_size: int) -> list[int]:
    """The ``start_pos`` of each chunk of an ``n``-token prompt: ``n - k*C + i*C`` for ``i < k = ceil(n/C)``."""
    chunks = -(-n // chunk_size)
    return [n - (chunks - i) * chunk_size for i in range(chunks)]


class CompiledLLM:
    """An artifact with prefill programs (per-bucket, or one chunk program) and a decode program, for greedy generation."""

    def __init__(self, model: CompiledModel, queue_cores: Mapping[str, Sequence[int]] | None = None):
        """``queue_cores`` (queue -> CPU cores): pin each queue's worker of a scheduled chunked prefill."""
        self.model = model
        self._queue_cores = queue_cores
        index = model.manifest.get("llm")
        if index is None:
            raise KilnError("this artifact is not an LLM (its manifest has no field llm); compile it with "
                            "kiln.llm.compile_llm")
        self.prefill_graphs: dict[int, Program] = {
            int(b): model.programs[name]
            for b, name in sorted(index.get("prefill", {}).items(), key=lambda kv: int(kv[0]))}
        self.decode_graph: Program = model.programs[index["decode"]]
        decode = self.decode_graph
        cache = _cache_type(decode, "decode program")
        self.batch = decode.signature.inputs[0].type.shape[0]
        graphs = [(f"prefill program for bucket {b}", g, b) for b, g in self.prefill_graphs.items()]
        for name, graph, length in [("decode program", decode, 1), *graphs]:
            ids = graph.signature.inputs[0].type.shape
            if tuple(ids) != (self.batch, length) or _cache_type(graph, name) != cache:
                raise KilnError(f"{name} takes input_ids {list(ids)} and a cache {_cache_type(graph, name)}; "
                                f"expected input_ids {[self.batch, length]} and the decode program's cache {cache}")
        self.cache_shape = tuple(cache.shape)
        self.cache_dtype = dtype_from_name(cache.dtype)
        self.capacity = self.cache_shape[3]
        self.chunk_size: int | None = None
        self.chunk_graph: Program | None = None
        self.carry: dict[int, int] = {}  # the chunk program's output index -> the input index it feeds next chunk
        if "chunk" in index:
            self._init_chunk(index["chunk"], cache)
        elif not self.prefill_graphs:
            raise KilnError("this LLM artifact has no prefill program: its llm index has neither prefill buckets "
                            "nor a chunk program")

    def _init_chunk(self, chunk: dict, cache) -> None:
        """Check the chunk program against the decode program's cache and the index's carry (see the module doc)."""
        graph = self.model.programs[chunk["program"]]
        size, layers = chunk["size"], self.cache_shape[0]
        where = f"chunk program {chunk['program']!r}"
        names = tuple(i.name for i in graph.signature.inputs)
        cache_names = _chunk_cache_names(layers)
        if names != ("input_ids", *cache_names) or START_POS not in graph.controls:
            raise KilnError(f"{where} takes inputs {names} and controls {tuple(graph.controls)}; a chunk program "
                            f"takes input_ids, {cache_names[0]} ... {cache_names[-1]} (one per layer of the decode "
                            f"program's cache {list(cache.shape)}) and the control {START_POS!r}")
        ids = graph.signature.inputs[0].type.shape
        layer_type = [list(cache.shape[1:]), cache.dtype]
        bad = [i.name for i in graph.signature.inputs[1:] if [list(i.type.shape), i.type.dtype] != layer_type]
        if tuple(ids) != (self.batch, size) or bad:
            raise KilnError(f"{where} takes input_ids {list(ids)} and caches {bad or 'of the right type'}; expected "
                            f"input_ids {[self.batch, size]} and one layer of the decode program's cache "
                            f"({cache.dtype} {list(cache.shape[1:])}) each")
        outputs, carry = list(chunk["outputs"]), chunk["carry"]
        if len(outputs) != len(graph.entry["outputs"]) or len(set(outputs)) != len(outputs):
            raise KilnError(f"{where}: the llm index names {len(outputs)} outputs {outputs}; the program has "
                            f"{len(graph.entry['outputs'])}")
        if outputs[0] != "logits" or sorted(carry.values()) != sorted(cache_names) or not set(carry) <= set(outputs):
            raise KilnError(f"{where}: the llm index's carry {carry} must map outputs (of {outputs}, the first "
                            f"being logits) to every cache input ({', '.join(cache_names)}) once")
        self.chunk_size, self.chunk_graph = size, graph
        self.carry = {outputs.index(out): names.index(inp) - 1 for out, inp in carry.items()}  # -1: input_ids
        # ScheduleBlocks' out-of-order orders (compile_llm(schedule=...)): chunks run as one chain
        self.chain: Chain | None = None
        self.prefill_order = IN_ORDER
        if "chain" in graph.entry:
            self.chain = Chain(graph, self._queue_cores)
            self.prefill_order = SCHEDULED

    def pin_queues(self, queue_cores: Mapping[str, Sequence[int]] | None) -> None:
        """Pin each queue's worker of the scheduled chunked prefill to CPU cores (None: unpinned)."""
        if self.chain is None:
            raise KilnError("this LLM has no scheduled chunk program (compile_llm(..., chunk_size=C, schedule=...))")
        self.chain = Chain(self.chunk_graph, queue_cores)

    @property
    def buckets(self) -> list[int]:
        return list(self.prefill_graphs)

    def chunk_starts(self, n: int) -> list[int]:
        """The ``start_pos`` of each chunk of an ``n``-token prompt: ``n - k*C + i*C`` for ``i < k = ceil(n/C)``."""
        if self.chunk_size is None:
            raise KilnError("this LLM has no chunk program; compile it with compile_llm(..., chunk_size=...)")
        self._check_prompt(n)
        return chunk_starts(n, self.chunk_size)

    @property
    def artifact(self):
        return self.model.artifact

    @property
    def manifest(self) -> dict:
        return self.model.manifest

    def empty_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(self.cache_shape, dtype=self.cache_dtype),
                torch.zeros(self.cache_shape, dtype=self.cache_dtype))

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompt ``[batch, n]``: as chunks, or through the smallest bucket that fits.

        Returns (the logits of token ``n-1`` ``[batch, vocab]``, k, v), the caches stacked as decode takes them.
        """
        input_ids = self._check_ids(input_ids)
        n = input_ids.shape[1]
        if self.chunk_graph is not None:
            return self._prefill_chunks(input_ids)
        bucket = self._check_prompt(n)
        padded = torch.zeros(self.batch, bucket, dtype=torch.int64)
        padded[:, bucket - n:] = input_ids
        logits, k, v = self.prefill_graphs[bucket].run([padded, *self.empty_cache()],
                                                       controls={START_POS: n - bucket})
        return logits[:, -1], k, v

    def _prefill_chunks(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, size = input_ids.shape[1], self.chunk_size
        starts = self.chunk_starts(n)
        padded = torch.zeros(self.batch, len(starts) * size, dtype=torch.int64)
        padded[:, padded.shape[1] - n:] = input_ids  # the padding: the first chunk's negative positions
        k, v = self.empty_cache()
        state = [*k.unbind(0), *v.unbind(0)]  # per-layer views, in the chunk program's input order
        if self.chain is not None:  # the chunks as one chain: in order, or ScheduleBlocks' order
            chunks = [padded[:, i * size:(i + 1) * size].contiguous() for i in range(len(starts))]
            steps = [[ids, *(state if i == 0 else [None] * len(state))] for i, ids in enumerate(chunks)]
            order = self.prefill_order if len(starts) <= self.chain.max_steps else IN_ORDER
            outputs = self.chain.run(steps, [{START_POS: s} for s in starts], order=order)
            self._take_carry(state, outputs)
        else:
            for i, start in enumerate(starts):
                ids = padded[:, i * size:(i + 1) * size].contiguous()
                outputs = self.chunk_graph.run([ids, *state], controls={START_POS: start})
                self._take_carry(state, outputs)
        layers = self.cache_shape[0]
        return outputs[0][:, -1], torch.stack(state[:layers]), torch.stack(state[layers:])

    def _take_carry(self, state: list, outputs: list) -> None:
        """The carried outputs of a chunk into ``state``, the next chunk's cache inputs."""
        for out, inp in self.carry.items():
            state[inp] = outputs[out]

    def decode(self, token_ids: torch.Tensor, pos: int, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row ``[batch, 1]`` at position ``pos``; returns (its logits ``[batch, vocab]``, k, v)."""
        if not 0 <= pos < self.capacity:
            raise InputMismatchError(f"decode position {pos} is outside the KV cache (capacity {self.capacity}); "
                                     "compile_llm(..., capacity=...) sets it")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if tuple(cache.shape) != self.cache_shape or cache.dtype != self.cache_dtype:
                raise InputMismatchError(f"{name} is {cache.dtype} {list(cache.shape)}; the programs take "
                                         f"{self.cache_dtype} {list(self.cache_shape)}")
        logits, k, v = self.decode_graph.run([self._check_ids(token_ids), k_cache, v_cache],
                                             controls={START_POS: pos})
        return logits[:, -1], k, v

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: ``[batch, n]`` prompt ids -> ``[batch, n + max_new_tokens]`` (prompt, then new tokens)."""
        input_ids = self._check_ids(input_ids)
        n = input_ids.shape[1]
        self._check_prompt(n)  # an over-long prompt is refused before the capacity check
        if max_new_tokens < 0:
            raise InputMismatchError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
        if n + max_new_tokens > self.capacity:
            raise InputMismatchError(
                f"a prompt of {n} tokens plus max_new_tokens={max_new_tokens} needs {n + max_new_tokens} cache slots; "
                f"the KV cache was compiled with capacity {self.capacity} (compile_llm(..., capacity=...))")
        if max_new_tokens == 0:
            return input_ids.clone()
        logits, k, v = self.prefill(input_ids)
        tokens = [logits.argmax(-1, keepdim=True)]
        for pos in range(n, n + max_new_tokens - 1):
            logits, k, v = self.decode(tokens[-1], pos, k, v)
            tokens.append(logits.argmax(-1, keepdim=True))
        return torch.cat([input_ids, *tokens], dim=1)

    def save(self, path: str | os.PathLike, signing_key=None) -> Path:
        """Write the LLM as one kiln artifact at ``path`` (atomically), signed if given a ``signing_key``."""
        return self.model.save(path, signing_key)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.is_complex():
            raise InputMismatchError(f"token ids must be an integer tensor [batch, tokens]; got "
                                     f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
        if ids.shape[0] != self.batch:
            raise InputMismatchError(f"token ids have batch size {ids.shape[0]}; this LLM was compiled for batch "
                                     f"{self.batch} (compile_llm(..., batch={ids.shape[0]}))")
        return ids.to(torch.int64)

    def _check_prompt(self, n: int) -> int:
        """The bucket a prompt of ``n`` tokens runs in (chunked: ``n``), or InputMismatchError."""
        if n == 0:
            raise InputMismatchError("the prompt is empty; generation needs at least one token")
        if self.chunk_size is not None:
            if n > self.capacity:
                raise InputMismatchError(f"the prompt has {n} tokens, more than the KV cache capacity "
                                         f"({self.capacity}); compile_llm(..., capacity=...) sets it")
            return n
        for bucket in self.prefill_graphs:
            if bucket >= n:
                return bucket
        raise InputMismatchError(f"the prompt has {n} tokens, more than the largest prefill bucket "
                                 f"({self.buckets[-1]}); compile with a bucket >= {n} in prefill_buckets")

    def __repr__(self) -> str:
        prefill = f"chunk_size={self.chunk_size}" if self.chunk_size is not None else f"buckets={self.buckets}"
        return f"<kiln.CompiledLLM target={self.model.target} batch={self.batch} {prefill} capacity={self.capacity}>"


def _chunk_cache_names(layers: int) -> tuple[str, ...]:
    return tuple(f"k_cache_{l}" for l in range(layers)) + tuple(f"v_cache_{l}" for l in range(layers))


def _cache_type(graph: Program, name: str):
    names = tuple(i.name for i in graph.signature.inputs)
    if names != _INPUTS or START_POS not in graph.controls:
        raise KilnError(f"{name} takes inputs {names} and controls {tuple(graph.controls)}; an LLM program takes "
                        f"{_INPUTS} and the control {START_POS!r}")
    k, v = graph.signature.inputs[1].type, graph.signature.inputs[2].type
    if k != v or len(k.shape) != 5:
        raise KilnError(f"{name}: k_cache {k} and v_cache {v} must both be [layers, batch, kv_heads, capacity, head_dim]")
    return k


def load(path: str | os.PathLike, trusted_keys=None) -> CompiledLLM:
    """Load a :class:`CompiledLLM` saved by ``CompiledLLM.save``, verifying the artifact (runtime only).

    ``trusted_keys``: the artifact must be signed by one of them (``kiln.load``).
    """
    path = Path(path)
    if (path / OLD_INDEX).is_file() and not (path / "manifest.json").exists():
        raise ArtifactError(f"{path} is an LLM saved by kiln 0.1 as a directory of artifacts with {OLD_INDEX}; "
                            f"this runtime reads an LLM as one artifact (format 2); {REBUILD}")
    return CompiledLLM(CompiledModel(read_artifact(path, trusted_keys)))
