"""Find a transformer's layers and, inside each, its attention and FFN / MoE regions.

The analysis reads only the module stack that torch.export records on every
node (``node.meta["nn_module_stack"]``: outermost module first, each entry a
``(module path, fully qualified class name)`` pair), so it needs a graph from
``torch.export.export(...)`` (decomposed or not) whose nodes still carry that
metadata. The stack's keys differ between strict and non-strict export (object
ids versus ``L__self__…`` names); only its values are used.

Rules, derived from the exported graphs of Llama, Qwen2, GPT-2, Mixtral, BERT,
ViT and MiniLM, with no per-model tables:

- A *layer* is an integer-indexed child of a container (``model.layers.3``,
  ``transformer.h.0``, ``encoder.layer.5``; a root ``nn.Sequential``'s ``"2"``)
  that calls a module whose class name contains ``Attention``. Only the
  outermost such module counts, so numbered experts or heads inside a layer are
  never layers. Layers are numbered in the order the graph first enters them.
- Inside a layer, the first module on a node's stack (below the layer) whose
  class name is recognised decides the node's role: ``*Attention*`` gives
  ``attention``; ``*MLP*``, ``*MoE*`` / ``*Moe*`` (sparse MoE blocks, their
  router included), ``*Expert*``, ``*FeedForward*``, ``*FFN*``, ``*LayerFF*``,
  ``*Intermediate*`` and ``*Output`` but not ``*SelfOutput`` (BERT-family
  models split their FFN into ``Intermediate`` + ``Output``) give ``ffn``.
  Everything else in the layer (norms and residual adds called by the layer
  itself) is ``other``.
- The stack is the call chain, not the ownership tree: a shared module called
  from inside a layer's attention (e.g. a model-level rotary embedding) belongs
  to that attention region.
- Placeholders and the output are never in a region, even when a pass copied a
  module stack onto them (as ``torch.fx``'s ``split_module`` does).

What passes building on this must know: work every layer shares is computed
once outside the layers (HF builds the attention mask and RoPE cos/sin at model
level) and enters each attention region as an input. Post-norm models (BERT)
compute their residual add and LayerNorm inside the attention and FFN output
modules, so those nodes are in the regions and ``other`` is empty.

Not handled: layers that are not integer-indexed children of a container;
layers without an attention module (pure MLP or state-space blocks: the model
then gives no layers); FFN weights held directly by the layer rather than by a
submodule (``nn.TransformerEncoderLayer``'s ``linear1``/``linear2`` land in
``other``); a layer with several attention submodules (a decoder with
cross-attention) has all of them in ``attention`` but only the first in
``attention_path``; nodes that lost their module stack (e.g. created by a pass
that does not copy metadata) are left out of every region.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_ATTENTION = re.compile(r"Attention")
_FFN = re.compile(r"MLP|Mlp|MoE|Moe|Expert|FeedForward|FFN|Ffn|LayerFF|Intermediate|(?<!Self)Output$")

REGION_ROLES = ("attention", "ffn", "other")  # how a layer splits; NodeMeta.role adds "comm" for collectives


@dataclass(frozen=True)
class LayerRegion:
    """One transformer layer of an exported graph and the split of its nodes by role."""

    index: int                  # position among the model's layers, 0-based
    path: str                   # module path of the layer, e.g. "model.layers.0"
    module_type: str            # class name, e.g. "LlamaDecoderLayer"
    attention: tuple[str, ...]  # node names in the attention region, in graph order
    ffn: tuple[str, ...]        # node names in the FFN / MoE region, in graph order
    other: tuple[str, ...]      # the rest of the layer (norms, residual adds)
    attention_path: str | None  # module path of the attention submodule
    ffn_paths: tuple[str, ...]  # module path(s) of the FFN region (BERT has two: intermediate, output)


def _stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """The node's module call chain as (path, short class name), outermost first."""
    if node.op in ("placeholder", "output"):
        return []
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, qualname.rsplit(".", 1)[-1]) for path, qualname in stack.values()]


def _is_indexed(path: str) -> bool:
    return path.rsplit(".", 1)[-1].isdigit()


def _layer_candidates(stacks: list[list[tuple[str, str]]]) -> set[str]:
    """Integer-indexed modules that call an attention module somewhere below them."""
    candidates: set[str] = set()
    for stack in stacks:
        for i, (path, _) in enumerate(stack):
            if _is_indexed(path) and any(_ATTENTION.search(cls) for _, cls in stack[i + 1:]):
                candidates.add(path)
    return candidates


def _role(below_layer: list[tuple[str, str]]) -> tuple[str, str | None]:
    """Role of a node from the part of its stack under its layer, and the module that decided it."""
    for path, cls in below_layer:
        if _ATTENTION.search(cls):
            return "attention", path
        if _FFN.search(cls):
            return "ffn", path
    return "other", None


def find_regions(gm: torch.fx.GraphModule) -> list[LayerRegion]:
    """The transformer layers of an exported graph, in execution order; ``[]`` if it has none."""
    stacks = [(node.name, _stack(node)) for node in gm.graph.nodes]
    candidates = _layer_candidates([s for _, s in stacks])

    # Per layer, in first-seen order: class name, role -> node names, region -> module paths.
    layers: dict[str, tuple[str, dict[str, list[str]], dict[str, list[str]]]] = {}
    for name, stack in stacks:
        # The outermost candidate on the stack is the layer; nested ones (an
        # attention block numbered inside a layer) are not layers of the model.
        pos = next((i for i, (path, _) in enumerate(stack) if path in candidates), None)
        if pos is None:
            continue
        layer_path, layer_cls = stack[pos]
        if layer_path not in layers:
            layers[layer_path] = (layer_cls, {r: [] for r in REGION_ROLES}, {"attention": [], "ffn": []})
        _, nodes, paths = layers[layer_path]
        role, module = _role(stack[pos + 1:])
        nodes[role].append(name)
        if module is not None and module not in paths[role]:
            paths[role].append(module)

    return [
        LayerRegion(
            index=index,
            path=path,
            module_type=cls,
            attention=tuple(nodes["attention"]),
            ffn=tuple(nodes["ffn"]),
            other=tuple(nodes["other"]),
            attention_path=paths["attention"][0] if paths["attention"] else None,
            ffn_paths=tuple(paths["ffn"]),
        )
        for index, (path, (cls, nodes, paths)) in enumerate(layers.items())
    ]


def node_roles(regions: list[LayerRegion]) -> dict[str, tuple[int, str]]:
    """Map every node name in ``regions`` to ``(layer index, role)``; role is one of :data:`REGION_ROLES`."""
    roles: dict[str, tuple[int, str]] = {}
    for region in regions:
        for role in REGION_ROLES:
            for name in getattr(region, role):
                roles[name] = (region.index, role)
    return roles
