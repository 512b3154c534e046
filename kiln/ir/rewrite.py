"""Insert and replace nodes so that they keep the metadata of the nodes they derive from.

A pass that builds a node with ``graph.call_function`` gets a bare node: no
``nn_module_stack`` (so region analysis leaves it out of every layer), no
layer, role or placement, and the pass manager records it as created by the
pass. :func:`insert_node` and :func:`replace_node` copy from the node a new
one derives from (its *origin*):

- the FX metadata that says where the node came from in the model
  (:data:`CARRIED_FX_META`: ``nn_module_stack``, ``stack_trace``,
  ``source_fn_stack``, ``torch_fn``);
- the kiln annotations in :data:`CARRIED_FIELDS` (placement, queue, program,
  layer, role, chunk, stage; ``quant`` only on a replacement, which computes the same op);
- provenance: a helper node inserted for the origin (a slice of its input) is
  created by the running pass; a *replacement* (the origin computed another
  way: on fewer rows, with other arguments) keeps the origin's ``created_by``
  and ``rewritten_by``, and the pass manager appends the running pass to
  ``rewritten_by`` (it finds the mark :data:`REPLACES_KEY` and removes it).

The node's shape and dtype come from ``val`` when given (a fake tensor); the
pass manager re-propagates types after the pass in any case.
"""
from __future__ import annotations

import torch.fx as fx

from .meta import META_KEY, NodeMeta, types_of

CARRIED_FX_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")
CARRIED_FIELDS = ("placement", "queue", "program", "layer", "role", "chunk", "stage")
REPLACES_KEY = "kiln_replaces"  # on a replacement until the pass manager stamps its provenance


def node_arg(node: fx.Node, i: int, key: str, default=None):
    """Argument ``i`` of ``node``, given positionally or as ``key`` (``default`` when neither)."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def copy_metadata(new: fx.Node, origin: fx.Node, *, replaces: bool = False) -> None:
    """Give ``new`` the module stack, annotations and (for a replacement) provenance of ``origin``."""
    for key in CARRIED_FX_META:
        if key in origin.meta:
            value = origin.meta[key]
            new.meta[key] = dict(value) if isinstance(value, dict) else value
    old = origin.meta.get(META_KEY)
    meta = new.meta.get(META_KEY)
    if not isinstance(meta, NodeMeta):
        meta = new.meta[META_KEY] = NodeMeta(types=types_of(new.meta.get("val")))
    if not isinstance(old, NodeMeta):
        return
    for key in CARRIED_FIELDS + (("quant",) if replaces else ()):
        setattr(meta, key, getattr(old, key))
    if replaces:
        meta.created_by, meta.rewritten_by = old.created_by, list(old.rewritten_by)
        new.meta[REPLACES_KEY] = origin.name


def insert_node(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None, *, origin: fx.Node,
                before: fx.Node | None = None, val=None, replaces: bool = False) -> fx.Node:
    """A new ``call_function`` node ``target(*args, **kwargs)`` carrying ``origin``'s metadata.

    It goes right before ``before`` (default: before ``origin``). ``replaces``
    says the node is ``origin`` computed another way (see the module docstring);
    the caller rewires the users and erases what it replaces.
    """
    with graph.inserting_before(before if before is not None else origin):
        node = graph.call_function(target, tuple(args), dict(kwargs or {}))
    if val is not None:
        node.meta["val"] = val
    node.meta[META_KEY] = NodeMeta(types=types_of(val))
    copy_metadata(node, origin, replaces=replaces)
    return node


def replace_node(graph: fx.Graph, old: fx.Node, target, args: tuple, kwargs: dict | None = None, *,
                 val=None) -> fx.Node:
    """Replace ``old`` by ``target(*args, **kwargs)``: every user of ``old`` reads the new node, ``old`` goes."""
    new = insert_node(graph, target, args, kwargs, origin=old, val=val, replaces=True)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


def stamp_provenance(node: fx.Node, pass_name: str) -> None:
    """For the pass manager: stamp ``pass_name`` on a node that the pass added.

    A replacement (marked by :func:`copy_metadata`) keeps its origin's
    ``created_by`` and gets ``pass_name`` appended to ``rewritten_by``; any
    other new node is created by ``pass_name``.
    """
    meta = node.meta.get(META_KEY)
    fields = dict(meta.__dict__) if isinstance(meta, NodeMeta) else {}
    if node.meta.pop(REPLACES_KEY, None) is not None and isinstance(meta, NodeMeta):
        fields["rewritten_by"] = [*meta.rewritten_by, pass_name]
    else:
        fields.update(created_by=pass_name, rewritten_by=[])
    node.meta[META_KEY] = NodeMeta(**fields)
