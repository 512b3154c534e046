"""Collectives as graph nodes: the ``_c10d_functional`` ops kiln's IR, artifacts and ``torch`` backend admit.

A model that calls ``torch.distributed._functional_collectives`` (``all_reduce``,
``all_gather_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``,
``broadcast``) exports to these ops: each collective returns its result
asynchronously and a ``wait_tensor`` node makes it ready. They take the
process group by name (``dist.group.WORLD.group_name``, ``"0"`` for the first
group), so a graph that calls them runs in a process where
``torch.distributed.init_process_group`` made a group of that name (gloo on
CPU, NCCL on GPU); the ``torch-graph`` kernel says so when it is not.

A collective is a side effect: every rank of its group waits for it, so a
rank that dropped one (dead-code elimination of an unused result) or
computed it at compile time (constant folding of a weight's all-reduce)
would hang or desynchronise the others. :func:`has_side_effects` is the one
test passes use. Region analysis gives collectives ``role="comm"``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

_COLLECTIVE_NAMES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
                     "broadcast", "wait_tensor")


def _functional_collectives() -> frozenset:
    namespace = torch.ops._c10d_functional
    ops = set()
    for name in _COLLECTIVE_NAMES:
        try:
            ops.add(getattr(namespace, name).default)
        except (AttributeError, RuntimeError):  # a torch built without distributed
            pass
    return frozenset(ops)


# Every collective op kiln admits (the JSON serializer, the torch backend and the runtime read this).
COLLECTIVES: frozenset[torch._ops.OpOverload] = _functional_collectives()


def is_collective(target) -> bool:
    return target in COLLECTIVES


def has_side_effects(node: fx.Node) -> bool:
    """Whether ``node`` must run even when nothing reads its value, and never at compile time.

    FX's impure ops (in-place writes, run-time asserts, random ops) and the
    collectives (FX counts those pure: their results are values, their
    effect is on the other ranks).
    """
    return node.op == "call_function" and (node.is_impure() or node.target in COLLECTIVES)


def process_group_names(gm: fx.GraphModule) -> list[str]:
    """The process-group names the collectives of ``gm`` run over, in first-use order."""
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in COLLECTIVES and node.target._opname != "wait_tensor":
            group = node.args[-1] if node.args else node.kwargs.get("group_name")
            if isinstance(group, str) and group not in names:
                names.append(group)
    return names
