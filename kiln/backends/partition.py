"""Choosing what runs where, and cutting the graph into per-backend partitions.

``assign_placement`` tags every compute node with the backend of the target
that supports it at the lowest ``Backend.cost``, or the first that supports
it where no backend prices it (first-fit); a placement a pass already set is
kept, and checked. The ``place`` pass (``kiln/passes/place.py``) runs it as
a pass, so a pipeline ending in it shows the placements in ``kiln inspect``.
``split_by_placement`` then cuts the graph into maximal runs of consecutive
nodes (in topological order) with one placement and one queue
(``NodeMeta.queue``, set by a pass that schedules across queues; None: the
default queue); consecutive runs are always acyclic, so their order is a
valid schedule, and each task waits only for the tasks computing its inputs.

``place_and_lower`` does both and lowers every partition. A backend that
cannot lower a partition it said it supports (a converter refusing one node,
or the compiler behind it failing) does not fail the compilation: the node it
names, else the whole partition, moves to the target's fallback backend (its
last, ``torch``), the failure is logged and recorded, and placement runs
again. A result is computed right or by the fallback, never a foreign exception.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.fx as fx

from ..errors import KilnError, UnsupportedOpError
from ..ir import Graph
from ..ir.printer import op_name
from .base import Backend, LoweredPartition, Partition

log = logging.getLogger("kiln")


def assign_placement(graph: Graph, target: str, backends: list[Backend]) -> dict[str, str]:
    """Place every unplaced compute node (see the module doc); returns why the target's first backend refused
    each node it placed elsewhere: node name -> reason (``Backend.refusal``).

    A node placed on a backend with a ``default_queue`` (``npu`` -> ``npu0``) gets that queue unless a pass
    set one.
    """
    by_name = {b.name: b for b in backends}
    fallbacks: Counter[str] = Counter()
    refusals: dict[str, str] = {}
    first = backends[0]
    for node in graph.compute_nodes():
        meta = graph.meta(node)
        if meta.placement is not None:
            backend = by_name.get(meta.placement)
            if backend is None or not backend.supports(node):
                raise UnsupportedOpError(
                    f"node {node.name} ({op_name(node.target)}) was placed on {meta.placement!r}, "
                    f"which target {target!r} cannot run it on (its backends: {', '.join(by_name)})")
            if meta.queue is None and backend.default_queue is not None:
                meta.queue = backend.default_queue
            continue
        backend = _choose(node, backends)
        if backend is not None:
            meta.placement = backend.name
            if meta.queue is None and backend.default_queue is not None:
                meta.queue = backend.default_queue
            if backend is not first:
                fallbacks[f"{op_name(node.target)} -> {backend.name}"] += 1
                why = first.refusal(node)
                if why is not None:  # (not when the first supports it and another was cheaper)
                    refusals[node.name] = why
        else:
            raise UnsupportedOpError(
                f"node {node.name}: op {op_name(node.target)} is not supported by target {target!r} "
                f"(backends tried: {', '.join(by_name)})" + _where(node))
    if fallbacks:
        log.info("kiln: target %r: %d nodes not supported by %r fall back: %s", target, sum(fallbacks.values()),
                 first.name, ", ".join(f"{k} (x{n})" for k, n in sorted(fallbacks.items())))
    return refusals


def _choose(node: fx.Node, backends: list[Backend]) -> Backend | None:
    """The cheapest backend supporting ``node`` among those that price it (``Backend.cost``), else the first."""
    supporting = [b for b in backends if b.supports(node)]
    priced = [(cost, i) for i, b in enumerate(supporting) if (cost := b.cost(node)) is not None]
    if priced:
        return supporting[min(priced)[1]]
    return supporting[0] if supporting else None


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        return f"; it comes from module '{path}' ({cls.rsplit('.', 1)[-1]})"
    return ""


def split_by_placement(graph: Graph) -> tuple[list[Partition], list[dict]]:
    """Partitions in execution order, and the model's flat outputs: ``{"value": name}`` or ``{"literal": x}``."""
    runs: list[list[fx.Node]] = []
    def key(node: fx.Node) -> tuple[str | None, str | None]:
        return graph.meta(node).placement, graph.meta(node).queue

    for node in graph.compute_nodes():
        if runs and key(runs[-1][0]) == key(node):
            runs[-1].append(node)
        else:
            runs.append([node])
    output_node = graph.output_node()
    partitions = []
    for i, run in enumerate(runs):
        members = set(run)
        inputs: list[fx.Node] = []
        for n in run:
            for inp in n.all_input_nodes:
                if inp not in members and inp not in inputs:
                    inputs.append(inp)
        outputs = [n for n in run if any(u not in members for u in n.users)]
        activations = [n for n in inputs if not graph.is_weight(n)]
        weights = [n for n in inputs if graph.is_weight(n)]
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in activations + weights:
            env[n] = sub.placeholder(n.name)
            env[n].meta.update(n.meta)
        for n in run:
            env[n] = sub.node_copy(n, env.__getitem__)
        sub.output(tuple(env[n] for n in outputs))
        placement, queue = key(run[0])
        partitions.append(Partition(
            name=f"part{i}_{placement}",
            backend=placement,
            gm=fx.GraphModule(torch.nn.Module(), sub),
            inputs=[n.name for n in activations],
            outputs=[n.name for n in outputs],
            weight_names=[n.name for n in weights],
            weights={n.name: graph.weights[n.name] for n in weights},
            queue=queue,
        ))
    flat_outputs = [{"value": a.name} if isinstance(a, fx.Node) else {"literal": a} for a in _flat(output_node.args[0])]
    return partitions, flat_outputs


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]


def place_and_lower(graph: Graph, target: str, backends: list[Backend]
                    ) -> tuple[list[Partition], dict[str, LoweredPartition], list[dict], list[dict]]:
    """Place, partition and lower ``graph``: the partitions, their lowerings by name, the flat outputs,
    and the fallbacks taken (``{"backend", "nodes", "reason"}`` each, also logged)."""
    fallback = backends[-1]
    fallbacks: list[dict] = []
    while True:
        assign_placement(graph, target, backends)
        partitions, outputs = split_by_placement(graph)
        by_name = {b.name: b for b in backends}
        lowered: dict[str, LoweredPartition] = {}
        for p in partitions:
            backend = by_name[p.backend]
            if backend is fallback:
                lowered[p.name] = backend.lower(p)
                continue
            try:
                lowered[p.name] = backend.lower(p)
            except KilnError as e:
                if not isinstance(e, UnsupportedOpError):
                    raise  # the user's options or files are at fault (TuningError...), not the op
                nodes = _fall_back(graph, p, e, fallback.name, backend.default_queue)
                fallbacks.append(_report(p, nodes, e, fallback.name))
                break
            except Exception as e:  # noqa: BLE001 - the compiler behind the backend failed: fall back
                nodes = _fall_back(graph, p, e, fallback.name, backend.default_queue)
                fallbacks.append(_report(p, nodes, e, fallback.name))
                break
        else:
            return partitions, lowered, outputs, fallbacks


def _report(partition: Partition, nodes: list[str], error: Exception, fallback: str) -> dict:
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    log.warning("kiln: backend %r could not lower %s (%s); %d node(s) run on %r instead: %s", partition.backend,
                partition.name, reason, len(nodes), fallback, ", ".join(nodes[:8]) + (" ..." if len(nodes) > 8 else ""))
    return {"backend": partition.backend, "nodes": nodes, "reason": reason}


def _fall_back(graph: Graph, partition: Partition, error: Exception, fallback: str,
               queue: str | None = None) -> list[str]:
    """Re-place on ``fallback`` the node ``error`` names, else every node of ``partition``; their names.

    A node on ``queue`` (the failed backend's default queue, which placement gave it) goes back to the default."""
    members = {n.name: n for n in graph.compute_nodes()}
    named = getattr(error, "node", None)
    if isinstance(error, UnsupportedOpError) and named in members and graph.meta(members[named]).placement \
            == partition.backend:
        chosen = [members[named]]
    else:
        inside = {n.name for n in partition.gm.graph.nodes if n.op == "call_function"}
        chosen = [n for name, n in members.items() if name in inside]
    for n in chosen:
        graph.meta(n).placement = fallback
        if queue is not None and graph.meta(n).queue == queue:
            graph.meta(n).queue = None
    return [n.name for n in chosen]
