"""Placement as a pass: every compute node gets the backend it will run on, before lowering.

It runs :func:`kiln.backends.assign_placement` with the compile target's
backends (``PassContext.backends``, the ones lowering will use): a placement an earlier pass set is kept (and checked: the backend
must support the node), every other node goes to the supporting backend with
the lowest ``Backend.cost``, or the first that supports it where none prices
it (first-fit). The pass manager records each placed node as annotated and
stamps its provenance, so ``kiln inspect`` shows where each node runs and who
put it there. It ends the default pipelines (stage ``placement``): a pass
after it sees the placements and keeps them, or sets its own (and must check
them with the backend). Lowering places what is still unplaced (a pipeline
without this pass), and moves a node its backend then fails to lower to the
fallback. Stats: the number of nodes per backend (``on_<backend>``), and
for the nodes the target's first backend did not get, how many
(``refused_by_<backend>``) and how many for each reason
(``refused_by_<backend>: <reason>``, e.g. ``refused_by_npu: aten.softmax.int:
a float softmax; it stays on the CPU``); each such node's reason is in the
record's ``notes`` (``kiln inspect`` lists them, the manifest's pass
records keep them). Nodes placed on a backend with a default queue
(``npu`` -> ``npu0``) get it unless a pass set a queue.
"""
from __future__ import annotations

from collections import Counter

from ..ir import Graph
from .base import Pass, PassContext, PassResult, register_pass


@register_pass
class Place(Pass):
    name = "place"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from ..backends import assign_placement, target_backends  # the compile side, only when placing

        backends = ctx.backends if ctx.backends is not None else target_backends(ctx.target, ctx.options)
        before = {n.name: (graph.meta(n).placement, graph.meta(n).queue) for n in graph.compute_nodes()}
        refusals = assign_placement(graph, ctx.target, backends)
        after = {n.name: (graph.meta(n).placement, graph.meta(n).queue) for n in graph.compute_nodes()}
        counts = Counter(p for p, _ in after.values())
        stats = {f"on_{b}": n for b, n in sorted(counts.items())}
        if refusals:
            first = backends[0].name
            stats[f"refused_by_{first}"] = len(refusals)
            for reason, n in sorted(Counter(refusals.values()).items()):
                stats[f"refused_by_{first}: {reason}"] = n
        return PassResult(after != before, stats, notes=refusals)
