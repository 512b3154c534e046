"""Mark every node of a transformer layer with its layer index and role (attention / ffn / other / comm).

An analysis: it changes no node, only ``NodeMeta.layer`` and ``NodeMeta.role``,
from :func:`kiln.ir.regions.find_regions`. Per-layer bit-widths, NPU blocks and
attention/FFN disaggregation read these fields. Needs module stacks on the
nodes (any traced graph has them); run it after the clean-up stage so folded
nodes are gone. Nodes outside every layer (embeddings, the final norm and head)
keep ``layer=None``. Collectives (``kiln.ir.collectives``) get ``role="comm"``
wherever they are, inside a layer (with its index) or not: the communication
passes schedule them by that role.
"""
from __future__ import annotations

from ..ir import Graph
from ..ir.collectives import is_collective
from ..ir.meta import ROLES
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
            if node.op == "call_function" and is_collective(node.target):
                role = "comm"
            if (meta.layer, meta.role) != (layer, role):
                meta.layer, meta.role = layer, role
                changed += 1
        stats = {"layers": len(regions)}
        for role in ROLES:
            stats[role] = sum(1 for n in graph.fx.nodes if graph.meta(n).role == role)
        return PassResult(changed > 0, stats)
