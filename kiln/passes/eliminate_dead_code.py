"""Remove nodes whose values are never used, and weights that no node reads.

Needs nothing before it and may run anywhere; run it after passes that leave
unused nodes behind. Ops with side effects (run-time asserts) are kept.
"""
from __future__ import annotations

from ..ir import Graph
from .base import Pass, PassContext, PassResult, register_pass


@register_pass
class EliminateDeadCode(Pass):
    name = "eliminate_dead_code"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nodes = 0
        for node in reversed(list(graph.fx.nodes)):
            if node.op == "call_function" and not node.users and not node.is_impure():
                graph.fx.erase_node(node)
                nodes += 1
        dead_weights = [n for n in graph.weight_nodes() if not n.users]
        for n in dead_weights:
            graph.remove_weight(n)
        return PassResult(modified=bool(nodes or dead_weights), stats={"nodes": nodes, "weights": len(dead_weights)})
