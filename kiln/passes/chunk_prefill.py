"""Check that a graph is a chunk program of chunked prefill, and mark its per-layer cache inputs with their layer.

A chunk program (``kiln.llm.compile_llm(..., chunk_size=C)`` traces it from
:class:`kiln.llm.hf.LayerwiseKVCacheLM`) prefills ``C`` tokens at the run-time
position ``start_pos``, attending over the keys and values earlier chunks
left in the cache; the runtime (:class:`kiln.llm.CompiledLLM`) runs a prompt
of any length as a series of calls of this one static graph. The chunking
itself is that calling convention, not a rewrite: this pass changes no op.
What it does, and names in its stats:

- ``static_nodes``: every value has a static shape, and ``input_ids`` is
  ``[batch, C]`` (``C`` = the ``chunk_size`` it was built with, if any): one
  graph, built once, serves every chunk of every prompt (an NPU builds a graph
  per shape).
- ``cache_inputs``: the inputs are ``input_ids, start_pos, k_cache_0 ...
  k_cache_{L-1}, v_cache_0 ... v_cache_{L-1}``, each cache ``[batch,
  kv_heads, capacity, head_dim]`` of one type, ``C <= capacity``; every
  reader of layer ``l``'s cache input belongs to layer ``l`` (its
  ``NodeMeta.layer``). The inputs get ``NodeMeta.layer = l``, so a scheduler
  knows which layer's tasks consume them.
- ``cache_outputs``: the outputs are ``logits, k_new_0 ... k_new_{L-1},
  v_new_0 ...``, ``k_new_l`` of the cache's type, computed from layer ``l``'s
  cache input and from no node of a later layer.
- ``ops_joining_layers``: 0, or the pass raises. With the two checks above,
  no op joins the layers' caches (a ``stack`` of the new caches would put
  every layer in each output's inputs; an ``unbind`` of a stacked cache
  would be read by every layer): chunk ``i+1``'s layer-``l`` attention needs
  chunk ``i``'s ``k_new_l`` / ``v_new_l`` only, which is what an out-of-order
  scheduler over (chunk, layer) tasks needs.

Needs ``annotate_regions`` before it (the layer of every node); run it after
the rewrites that move ops across layers (``prune_rows``) and before placement.
Not in any default pipeline: ``compile_llm`` inserts it for the chunk program.
It raises :class:`kiln.errors.KilnError` naming the input, output or node at fault.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import KilnError
from ..ir import Graph
from ..ir.rows import static, val
from .base import Pass, PassContext, PassResult, register_pass

IDS, START_POS = "input_ids", "start_pos"


def cache_input_names(layers: int) -> list[str]:
    """The chunk program's cache inputs, in signature order."""
    return [f"k_cache_{l}" for l in range(layers)] + [f"v_cache_{l}" for l in range(layers)]


def output_names(layers: int) -> list[str]:
    """The chunk program's flat outputs, in order."""
    return ["logits"] + [f"k_new_{l}" for l in range(layers)] + [f"v_new_{l}" for l in range(layers)]


@register_pass
class ChunkPrefill(Pass):
    name = "chunk_prefill"
    requires = ("annotate_regions",)

    def __init__(self, chunk_size: int | None = None, layers: int | None = None):
        self.chunk_size = chunk_size  # None: whatever input_ids' length is
        self.layers = layers  # None: whatever the signature has

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        inputs = {n.name: n for n in graph.input_nodes()}
        names = [i.name for i in graph.signature.inputs]
        layers = (len(names) - 2) // 2
        expected = [IDS, START_POS, *cache_input_names(layers)]
        if names != expected or layers < 1:
            raise KilnError(f"chunk_prefill: the program takes inputs {names}; a chunk program takes "
                            f"{IDS}, {START_POS}, k_cache_0 ... k_cache_{{L-1}}, v_cache_0 ... (one cache tensor per "
                            "layer: trace kiln.llm.hf.LayerwiseKVCacheLM)")
        if self.layers is not None and layers != self.layers:
            raise KilnError(f"chunk_prefill: the program has caches for {layers} layers; the model has {self.layers}")
        chunk = self._check_static(graph, inputs)
        cache = self._cache_type(graph, inputs, layers, chunk)
        annotated = self._check_inputs(graph, inputs, layers)
        self._check_outputs(graph, inputs, layers, cache)
        return PassResult(annotated > 0, {
            "chunk_size": chunk, "layers": layers, "static_nodes": sum(1 for _ in graph.nodes),
            "cache_inputs": 2 * layers, "cache_outputs": 2 * layers, "ops_joining_layers": 0})

    def _check_static(self, graph: Graph, inputs: dict[str, fx.Node]) -> int:
        for node in graph.nodes:
            for v in _vals(node):
                if not static(v):
                    raise KilnError(f"chunk_prefill: node {node.name} ({node.target}) has the dynamic shape "
                                    f"{list(v.shape)}; a chunk program is one static graph")
        ids = val(inputs[IDS])
        if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise KilnError(f"chunk_prefill: input {IDS} must be integer token ids [batch, chunk]; got "
                            f"{getattr(ids, 'dtype', None)} {list(getattr(ids, 'shape', []))}")
        chunk = ids.shape[1]
        if self.chunk_size is not None and chunk != self.chunk_size:
            raise KilnError(f"chunk_prefill: input {IDS} is {list(ids.shape)}: {chunk} tokens, not the chunk size "
                            f"{self.chunk_size}")
        pos = val(inputs[START_POS])
        if pos is None or pos.dim() != 0 or pos.dtype.is_floating_point:
            raise KilnError(f"chunk_prefill: input {START_POS} must be a 0-d integer tensor; got "
                            f"{getattr(pos, 'dtype', None)} {list(getattr(pos, 'shape', []))}")
        return chunk

    def _cache_type(self, graph: Graph, inputs: dict[str, fx.Node], layers: int, chunk: int):
        batch = val(inputs[IDS]).shape[0]
        first = val(inputs["k_cache_0"])
        for name in cache_input_names(layers):
            v = val(inputs[name])
            if v is None or v.dim() != 4 or v.shape[0] != batch or (v.dtype, v.shape) != (first.dtype, first.shape):
                raise KilnError(f"chunk_prefill: input {name} is {getattr(v, 'dtype', None)} "
                                f"{list(getattr(v, 'shape', []))}; every cache input must be [batch={batch}, kv_heads, "
                                f"capacity, head_dim], of one type (k_cache_0 is {first.dtype} {list(first.shape)})")
        if chunk > first.shape[2]:
            raise KilnError(f"chunk_prefill: the chunk ({chunk} tokens) is longer than the cache capacity "
                            f"({first.shape[2]})")
        return first.dtype, tuple(first.shape)

    def _check_inputs(self, graph: Graph, inputs: dict[str, fx.Node], layers: int) -> int:
        annotated = 0
        for name in cache_input_names(layers):
            layer = int(name.rsplit("_", 1)[1])
            node = inputs[name]
            for user in node.users:
                if user.op == "output":
                    raise KilnError(f"chunk_prefill: input {name} is returned as it is; every layer must write its "
                                    "chunk's keys and values")
                got = graph.meta(user).layer
                if got != layer:
                    raise KilnError(f"chunk_prefill: node {user.name} ({user.target}) reads input {name} of layer "
                                    f"{layer} but belongs to {_layer(got)}: an op joins the layers' caches, so one "
                                    "layer's attention would wait on another layer's cache")
            meta = graph.meta(node)
            if meta.layer != layer:
                meta.layer = layer
                annotated += 1
        return annotated

    def _check_outputs(self, graph: Graph, inputs: dict[str, fx.Node], layers: int, cache: tuple) -> None:
        outs = list(graph.output_node().args[0])
        names = output_names(layers)
        if len(outs) != len(names):
            raise KilnError(f"chunk_prefill: the program has {len(outs)} outputs; a chunk program returns "
                            f"{len(names)} (logits, k_new_0 ... k_new_{layers - 1}, v_new_0 ...)")
        for name, out in zip(names[1:], outs[1:]):
            kind, layer = name.split("_")[0], int(name.rsplit("_", 1)[1])
            v = val(out)
            if v is None or (v.dtype, tuple(v.shape)) != cache:
                raise KilnError(f"chunk_prefill: output {name} is {getattr(v, 'dtype', None)} "
                                f"{list(getattr(v, 'shape', []))}; it must be the cache's type {cache[0]} "
                                f"{list(cache[1])}")
            ancestors = _ancestors(out)
            if inputs[f"{kind}_cache_{layer}"] not in ancestors:
                raise KilnError(f"chunk_prefill: output {name} ({out.name}) is not computed from input "
                                f"{kind}_cache_{layer}; it must be layer {layer}'s updated cache")
            later = [n for n in ancestors if (graph.meta(n).layer or 0) > layer]
            if later:
                n = later[0]
                raise KilnError(f"chunk_prefill: output {name} ({out.name}) depends on node {n.name} ({n.target}) of "
                                f"layer {graph.meta(n).layer}: an op joins the layers' caches, so layer {layer}'s "
                                "keys and values would wait for later layers")


def _vals(node: fx.Node) -> list[torch.Tensor]:
    v = node.meta.get("val")
    items = v if isinstance(v, (tuple, list)) else [v]
    return [x for x in items if isinstance(x, torch.Tensor)]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _layer(layer: int | None) -> str:
    return "no layer" if layer is None else f"layer {layer}"
