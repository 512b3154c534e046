"""An HF causal LM with its KV cache as explicit tensors, for tracing prefill and decode graphs.

:class:`KVCacheLM` wraps a transformers causal LM (Llama, Qwen2, Mixtral,
GPT-2) as a pure function of its inputs::

    forward(input_ids, start_pos, k_cache, v_cache) -> (logits, k_cache_new, v_cache_new)

``k_cache`` / ``v_cache`` are ``[layers, batch, kv_heads, capacity, head_dim]``;
``start_pos`` is a 0-d int64 tensor, the position of ``input_ids[:, 0]``. The
new tokens' keys and values are written at ``start_pos ... start_pos+len-1``
out of place, and every query attends over the whole capacity through an
additive mask that allows key position ``j`` for the query at position ``p``
iff ``j <= p``: that hides the unwritten tail of the cache and keeps causality
among the new tokens. ``start_pos`` is used only in tensor arithmetic, so
torch.export keeps it an ordinary input and one decode graph serves every step.

``logits`` are the last position's only, ``[batch, 1, vocab]``: generation
needs no other (transformers' ``generate`` keeps one too), and kiln's
``prune_rows`` then computes the LM head and the last layer's queries, MLP
and norm for that one row. A prompt shorter than its graph is left-padded
and run at a negative ``start_pos`` (``n - bucket``): the padding's
positions are below 0, so its keys and values are written nowhere, every
real query's mask hides it, and the last row is the prompt's last token.
Positions below 0 are clamped to 0 in ``position_ids`` (GPT-2 looks them up
in a table); the padding rows they feed are never read.

It hooks into the model through transformers' public extension points only:
a :class:`transformers.Cache` subclass passed as ``past_key_values`` (whose
``update`` returns the updated full-capacity tensors instead of writing in
place), an explicit 4-D attention mask (returned as is by
``create_causal_mask``) and explicit ``position_ids``.

Every op here is one the TVM frontend converts (``arange``, comparisons,
``where``, ``index_select``, ``stack``); there is no in-place write, no
``cumsum`` and no ``cat``. Sliding-window attention is refused: the mask would
not apply the window.

:class:`LayerwiseKVCacheLM` is the same function with one cache tensor per
layer in and out (``k_cache`` / ``v_cache`` tuples of ``[batch, kv_heads,
capacity, head_dim]``), for chunked prefill: no op joins the layers' caches
(no ``unbind`` of a stacked input, no ``stack`` of the outputs), so a
scheduler sees layer ``l``'s new keys and values as values of their own,
ready when layer ``l`` is done.

This module imports transformers, so only the compile side (:mod:`kiln.llm.compile`)
imports it; the runtime (:mod:`kiln.llm.runtime`) never does.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from ..errors import KilnError


def write_at(cache: torch.Tensor, new: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
    """``cache`` ``[B, H, C, D]`` with ``new`` ``[B, H, L, D]`` at positions ``start_pos ... start_pos+L-1``, out of place.

    Positions past the end of the cache are dropped (callers check capacity).
    """
    capacity, length = cache.shape[2], new.shape[2]
    offset = torch.arange(capacity, device=cache.device) - start_pos  # slot j takes new[:, :, j - start_pos]
    inside = ((offset >= 0) & (offset < length))[:, None]
    if length == 1:  # decode: new broadcasts over the slots; no gather needed
        return torch.where(inside, new, cache)
    return torch.where(inside, new.index_select(2, offset.clamp(0, length - 1)), cache)


def attention_mask(start_pos: torch.Tensor, length: int, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, length, capacity]``: 0 where query ``i`` may see slot ``j`` (``j <= start_pos + i``).

    A float mask rather than a bool one, because TVM's attention takes only an
    additive bias; ``finfo.min`` rather than ``-inf``, as transformers does.
    """
    query_pos = start_pos + torch.arange(length, device=start_pos.device)
    hidden = torch.arange(capacity, device=start_pos.device)[None, :] > query_pos[:, None]
    return (hidden.to(dtype) * torch.finfo(dtype).min)[None, None]


class _TensorCacheLayer(CacheLayerMixin):
    """One layer's keys and values as full-capacity tensors, replaced (never mutated) on update."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start_pos: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.start_pos = start_pos
        self.length = start_pos  # tokens written so far, as transformers' get_seq_length reports it
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # the tensors exist from construction

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = write_at(self.keys, key_states, self.start_pos)
        self.values = write_at(self.values, value_states, self.start_pos)
        self.length = self.start_pos + key_states.shape[2]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0  # attention always spans the whole capacity

    def get_seq_length(self):
        return self.length

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class TensorKVCache(Cache):
    """A transformers ``Cache`` over per-layer ``[batch, kv_heads, capacity, head_dim]`` tensors, updated functionally.

    ``k_layers`` / ``v_layers``: one tensor per layer (a stacked cache's ``unbind(0)``, or a tuple of inputs).
    """

    def __init__(self, k_layers, v_layers, start_pos: torch.Tensor):
        super().__init__(layers=[_TensorCacheLayer(k, v, start_pos) for k, v in zip(k_layers, v_layers, strict=True)])

    def per_layer(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return tuple(l.keys for l in self.layers), tuple(l.values for l in self.layers)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([l.keys for l in self.layers]), torch.stack([l.values for l in self.layers])


class KVCacheLM(nn.Module):
    """``(input_ids, start_pos, k_cache, v_cache) -> (last logits, k_cache_new, v_cache_new)`` around an HF causal LM."""

    def __init__(self, model: nn.Module):
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_hidden_layers"):
            raise KilnError(f"KVCacheLM wraps a transformers causal LM; {type(model).__name__} has no such config")
        if _uses_sliding_window(config):
            raise KilnError(f"{type(model).__name__} uses sliding-window attention, which KVCacheLM's mask does not "
                            "apply; build the model without it (e.g. use_sliding_window=False)")
        self.model = model
        self.layers = config.num_hidden_layers
        heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.dtype = next(model.parameters()).dtype

    def cache_shape(self, batch: int, capacity: int) -> tuple[int, ...]:
        return (self.layers, batch, self.kv_heads, capacity, self.head_dim)

    def empty_cache(self, batch: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.cache_shape(batch, capacity)
        return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = TensorKVCache(k_cache.unbind(0), v_cache.unbind(0), start_pos)
        logits = self._last_logits(input_ids, start_pos, cache, k_cache.shape[3])
        k_new, v_new = cache.stacked()
        return logits, k_new, v_new

    def _last_logits(self, input_ids: torch.Tensor, start_pos: torch.Tensor, cache: TensorKVCache,
                     capacity: int) -> torch.Tensor:
        batch, length = input_ids.shape
        positions = (start_pos + torch.arange(length, device=input_ids.device)).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask(start_pos, length, capacity, self.dtype),
                         position_ids=positions[None].expand(batch, length), past_key_values=cache, use_cache=True)
        return out.logits[:, -1:]


class LayerwiseKVCacheLM(KVCacheLM):
    """``(input_ids, start_pos, k_cache, v_cache) -> (last logits, k_new, v_new)`` with one cache tensor per layer.

    ``k_cache`` / ``v_cache`` (and ``k_new`` / ``v_new``) are tuples of
    ``layers`` tensors ``[batch, kv_heads, capacity, head_dim]``; torch.export
    names the inputs ``k_cache_0 ... k_cache_{L-1}``, ``v_cache_0 ...``, and
    the flat outputs are ``logits, k_new_0 ... k_new_{L-1}, v_new_0 ...``.
    Otherwise :class:`KVCacheLM` exactly: the same writes, mask and logits.
    """

    def empty_cache(self, batch: int, capacity: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        shape = self.cache_shape(batch, capacity)[1:]
        return (tuple(torch.zeros(shape, dtype=self.dtype) for _ in range(self.layers)),
                tuple(torch.zeros(shape, dtype=self.dtype) for _ in range(self.layers)))

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, k_cache: tuple[torch.Tensor, ...],
                v_cache: tuple[torch.Tensor, ...]):
        if len(k_cache) != self.layers or len(v_cache) != self.layers:
            raise KilnError(f"LayerwiseKVCacheLM takes one k and one v cache tensor per layer ({self.layers}); "
                            f"got {len(k_cache)} and {len(v_cache)}")
        cache = TensorKVCache(k_cache, v_cache, start_pos)
        logits = self._last_logits(input_ids, start_pos, cache, k_cache[0].shape[2])
        k_new, v_new = cache.per_layer()
        return logits, k_new, v_new


def _uses_sliding_window(config) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any(t != "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is not None
