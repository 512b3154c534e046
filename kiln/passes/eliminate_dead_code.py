"""Remove nodes whose values are never used, and weights that no node reads.

Needs nothing before it and may run anywhere; run it after passes that leave
unused nodes behind. Ops with side effects are kept
(``kiln.ir.collectives.has_side_effects``): run-time asserts, in-place and
random ops, and collectives, which the other ranks of their group wait for.
"""
from __future__ import annotations

from ..ir import Graph
from ..ir.collectives import has_side_effects
from .base import Pass, PassContext, PassResult, register_pass


@register_pass
class EliminateDeadCode(Pass):
    name = "eliminate_dead_code"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nodes = 0
        for node in reversed(list(graph.fx.nodes)):
            if node.op == "call_function" and not node.users and not has_side_effects(node):
                graph.fx.erase_node(node)
                nodes += 1
        dead_weights = [n for n in graph.weight_nodes() if not n.users]
        for n in dead_weights:
            graph.remove_weight(n)
        return PassResult(modified=bool(nodes or dead_weights), stats={"nodes": nodes, "weights": len(dead_weights)})
