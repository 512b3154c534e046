"""LLM generation with compiled prefill and decode graphs, the KV cache passed in and out as tensors.

``compile_llm(model)`` wraps a transformers causal LM (Llama, Qwen2, Mixtral,
GPT-2) in :class:`kiln.kv_cache.KVCacheLM` and compiles it with
``kiln.compile`` once per prompt-length bucket (prefill) and once for a single
token (decode); each graph is an ordinary kiln artifact. :class:`CompiledLLM`
runs them for greedy generation; ``CompiledLLM.save`` / :func:`load` store the
set as one sub-directory per graph plus ``llm.json``.

Every graph is ``(input_ids, start_pos, k_cache, v_cache) -> (logits,
k_cache_new, v_cache_new)``, ``logits`` being the last position's only
(``[batch, 1, vocab]``):

- Cache layout: ``k_cache`` and ``v_cache`` are ``[layers, batch, kv_heads,
  capacity, head_dim]`` in the model's dtype; slot ``j`` holds the token at
  position ``j``. The graphs never write in place: the updated cache is an
  output (backends such as TVM drop in-place buffer updates).
- ``start_pos`` is a 0-d int64 tensor, so one decode graph serves every step.
- Attention covers the whole capacity with a mask allowing slot ``j`` for the
  query at position ``p`` iff ``j <= p``.

Bucket policy: a prompt of ``n`` tokens is left-padded (with token 0) to the
smallest bucket ``>= n`` and prefilled at ``start_pos = n - bucket``, so its
tokens sit at positions ``0 .. n-1`` and its last token is the graph's last
row, whose logits give the first new token; decoding continues at position
``n``. The padding's positions are negative: its keys and values are written
to no slot, and no real query's mask lets it through, so it never affects a
result. A generation of ``m`` tokens needs ``n + m <= capacity``.

Not handled: prompts of different lengths in one batch (every row is padded
by the same amount), sampling (greedy only), stopping at an end-of-sequence token,
sliding-window attention, and sharing weights between the graphs (each
artifact stores its own copy).

This module is the runtime side too: :func:`load` and :class:`CompiledLLM`
import nothing from the compiler; :func:`compile_llm` imports it when called.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import __version__
from .errors import ArtifactError, InputMismatchError, KilnError
from .ir.meta import dtype_from_name
from .runtime import CompiledModel, load as load_artifact, write_artifact
from .runtime.artifact import atomic_directory, plain_name, read_json_document, tidy

INDEX = "llm.json"
FORMAT_NAME = "kiln-llm"
FORMAT_VERSION = 2  # 2: graphs return the last position's logits; prompts are left-padded
DECODE = "decode"
_INPUTS = ("input_ids", "start_pos", "k_cache", "v_cache")


class CompiledLLM:
    """Compiled prefill graphs (one per prompt-length bucket) and a decode graph, run for greedy generation."""

    def __init__(self, prefill: dict[int, CompiledModel], decode: CompiledModel):
        if not prefill:
            raise KilnError("a CompiledLLM needs at least one prefill graph")
        self.prefill_graphs = dict(sorted(prefill.items()))
        self.decode_graph = decode
        cache = _cache_type(decode, "decode graph")
        self.batch = decode.signature.inputs[0].type.shape[0]
        graphs = [(f"prefill graph for bucket {b}", g, b) for b, g in self.prefill_graphs.items()]
        for name, graph, length in [("decode graph", decode, 1), *graphs]:
            ids = graph.signature.inputs[0].type.shape
            if tuple(ids) != (self.batch, length) or _cache_type(graph, name) != cache:
                raise KilnError(f"{name} takes input_ids {list(ids)} and a cache {_cache_type(graph, name)}; "
                                f"expected input_ids {[self.batch, length]} and the decode graph's cache {cache}")
        self.cache_shape = tuple(cache.shape)
        self.cache_dtype = dtype_from_name(cache.dtype)
        self.capacity = self.cache_shape[3]

    @property
    def buckets(self) -> list[int]:
        return list(self.prefill_graphs)

    def empty_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(self.cache_shape, dtype=self.cache_dtype),
                torch.zeros(self.cache_shape, dtype=self.cache_dtype))

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompt ``[batch, n]`` through the smallest bucket that fits; returns (logits of token n-1, k, v)."""
        input_ids = self._check_ids(input_ids)
        n = input_ids.shape[1]
        bucket = self._bucket(n)
        padded = torch.zeros(self.batch, bucket, dtype=torch.int64)
        padded[:, bucket - n:] = input_ids
        logits, k, v = self.prefill_graphs[bucket].run([padded, torch.tensor(n - bucket), *self.empty_cache()])
        return logits[:, -1], k, v

    def decode(self, token_ids: torch.Tensor, pos: int, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row ``[batch, 1]`` at position ``pos``; returns (its logits ``[batch, vocab]``, k, v)."""
        if not 0 <= pos < self.capacity:
            raise InputMismatchError(f"decode position {pos} is outside the KV cache (capacity {self.capacity}); "
                                     "compile_llm(..., capacity=...) sets it")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if tuple(cache.shape) != self.cache_shape or cache.dtype != self.cache_dtype:
                raise InputMismatchError(f"{name} is {cache.dtype} {list(cache.shape)}; the graphs take "
                                         f"{self.cache_dtype} {list(self.cache_shape)}")
        logits, k, v = self.decode_graph.run([self._check_ids(token_ids), torch.tensor(pos), k_cache, v_cache])
        return logits[:, -1], k, v

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: ``[batch, n]`` prompt ids -> ``[batch, n + max_new_tokens]`` (prompt, then new tokens)."""
        input_ids = self._check_ids(input_ids)
        n = input_ids.shape[1]
        self._bucket(n)  # an over-long prompt is refused before the capacity check
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
        """Write every graph as a kiln artifact under ``path``, with ``llm.json`` naming them (atomically).

        ``signing_key`` signs every graph's manifest (``CompiledModel.save``).
        """
        path = Path(path)
        with atomic_directory(path, _entries, "a saved kiln LLM") as tmp:
            index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kiln_version": __version__,
                     "decode": DECODE, "prefill": {}}
            for bucket, graph in self.prefill_graphs.items():
                index["prefill"][str(bucket)] = f"prefill_{bucket}"
                write_artifact(graph.artifact, tmp / f"prefill_{bucket}", signing_key)
            write_artifact(self.decode_graph.artifact, tmp / DECODE, signing_key)
            (tmp / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
        return path

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.is_complex():
            raise InputMismatchError(f"token ids must be an integer tensor [batch, tokens]; got "
                                     f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
        if ids.shape[0] != self.batch:
            raise InputMismatchError(f"token ids have batch size {ids.shape[0]}; this LLM was compiled for batch "
                                     f"{self.batch} (compile_llm(..., batch={ids.shape[0]}))")
        return ids.to(torch.int64)

    def _bucket(self, n: int) -> int:
        if n == 0:
            raise InputMismatchError("the prompt is empty; generation needs at least one token")
        for bucket in self.prefill_graphs:
            if bucket >= n:
                return bucket
        raise InputMismatchError(f"the prompt has {n} tokens, more than the largest prefill bucket "
                                 f"({self.buckets[-1]}); compile with a bucket >= {n} in prefill_buckets")

    def __repr__(self) -> str:
        return (f"<kiln.CompiledLLM target={self.decode_graph.target} batch={self.batch} "
                f"buckets={self.buckets} capacity={self.capacity}>")


def _cache_type(graph: CompiledModel, name: str):
    names = tuple(i.name for i in graph.signature.inputs)
    if names != _INPUTS:
        raise KilnError(f"{name} takes inputs {names}; an LLM graph takes {_INPUTS}")
    k, v = graph.signature.inputs[2].type, graph.signature.inputs[3].type
    if k != v or len(k.shape) != 5:
        raise KilnError(f"{name}: k_cache {k} and v_cache {v} must both be [layers, batch, kv_heads, capacity, head_dim]")
    return k


def load(path: str | os.PathLike, trusted_keys=None) -> CompiledLLM:
    """Load a :class:`CompiledLLM` saved by ``CompiledLLM.save``, verifying every artifact (runtime only).

    ``trusted_keys``: every graph must be signed by one of them (``kiln.load``).
    """
    path = Path(path)
    if not path.is_dir():
        tidy(path, _entries, wait=True)  # a save may be replacing it, or one was killed half-way
    index = _read_index(path)
    prefill = {int(bucket): load_artifact(path / name, trusted_keys) for bucket, name in index["prefill"].items()}
    llm = CompiledLLM(prefill, load_artifact(path / index["decode"], trusted_keys))
    tidy(path, _entries, wait=False)
    return llm


def _read_index(path: Path) -> dict:
    """``llm.json``, checked: its version, and graph directories that are plain names (buckets: integers)."""
    ipath = path / INDEX
    index = read_json_document(ipath, FORMAT_NAME, "a saved kiln LLM")
    if index.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{ipath}: LLM index version {index.get('format_version')!r} is not supported "
                            f"(this runtime reads version {FORMAT_VERSION})")
    prefill = index.get("prefill")
    if not isinstance(prefill, dict) or not all(isinstance(b, str) and b.isdigit() for b in prefill):
        raise ArtifactError(f"{ipath}: field prefill must map bucket sizes to graph directories")
    for name in [index.get("decode"), *prefill.values()]:
        if not isinstance(name, str) or not plain_name(name):
            raise ArtifactError(f"{ipath}: graph directory {name!r} is not a plain name")
    return index


def _entries(path: Path) -> set[str] | None:
    """What a saved LLM at ``path`` owns (its index and graph directories); None if it is not one."""
    try:
        index = _read_index(path)
    except ArtifactError:
        return None
    return {INDEX, index["decode"], *index["prefill"].values()}


def compile_llm(model: torch.nn.Module, *, batch: int = 1, prefill_buckets=(32, 128), capacity: int = 256,
                target: str = "cpu", options=None) -> CompiledLLM:
    """Compile a transformers causal LM into prefill graphs (one per bucket) and a single-token decode graph.

    ``options`` (a ``kiln.CompileOptions``) applies to every graph; the shapes
    are static, so ``options.dynamic_shapes`` must be unset.
    """
    from .api import compile as kiln_compile
    from .kv_cache import KVCacheLM

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

    def compile_for(length: int) -> CompiledModel:
        ids = torch.zeros(batch, length, dtype=torch.int64)
        return kiln_compile(lm, (ids, torch.tensor(0), k, v), target=target, options=options)

    return CompiledLLM({b: compile_for(b) for b in buckets}, compile_for(1))
