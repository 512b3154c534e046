"""networkx views of the IR, for analyses that want a plain DAG."""
from __future__ import annotations

import networkx as nx

from .meta import META_KEY
from .printer import op_name


def to_networkx(graph) -> nx.DiGraph:
    """A DiGraph with one vertex per FX node (by name) and an edge per data dependency.

    Vertex attributes: ``op`` (FX op kind), ``target`` (printed op name) and
    ``meta`` (the node's :class:`~kiln.ir.meta.NodeMeta`).
    """
    g = nx.DiGraph(name=graph.name)
    for n in graph.fx.nodes:
        target = op_name(n.target) if n.op == "call_function" else n.op
        g.add_node(n.name, op=n.op, target=target, meta=n.meta.get(META_KEY))
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)
    return g
