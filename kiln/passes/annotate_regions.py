"""Mark every node of a transformer layer with its layer index and role (attention / ffn / other).

An analysis: it changes no node, only ``NodeMeta.layer`` and ``NodeMeta.role``,
from :func:`kiln.ir.regions.find_regions`. Per-layer bit-widths, NPU blocks and
attention/FFN disaggregation read these fields. Needs module stacks on the
nodes (any traced graph has them); run it after the clean-up stage so folded
nodes are gone. Nodes outside every layer (embeddings, the final norm and head)
keep ``layer=None``.
"""
from __future__ import annotations

from ..ir import Graph
from ..ir.regions import find_regions, node_roles
from .base import Pass, PassContext, PassResult, register_pass


@register_pass
class AnnotateRegions(Pass):
    name = "annotate_regions"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        regions = find_regions(graph.gm)
        roles = node_roles(regions)
        changed = 0
        for node in graph.fx.nodes:
            meta = graph.meta(node)
            layer, role = roles.get(node.name, (None, None))
            if (meta.layer, meta.role) != (layer, role):
                meta.layer, meta.role = layer, role
                changed += 1
        stats = {"layers": len(regions)}
        for role in ("attention", "ffn", "other"):
            stats[role] = sum(1 for _, r in roles.values() if r == role)
        return PassResult(changed > 0, stats)
