"""Remove the tensor-metadata asserts torch.export inserts for ``.to()`` calls.

``aten._assert_tensor_metadata`` re-checks, at every run, a dtype/device fact
that tracing already proved for the static shapes and dtypes kiln compiles
(run-time inputs are checked against the signature before a graph runs).
Backends then never see these side-effecting no-ops. Other asserts (such as
``_assert_scalar`` guarding dynamic-shape ranges) are kept. Needs nothing before it.
"""
from __future__ import annotations

import torch

from ..ir import Graph
from .base import Pass, PassContext, PassResult, register_pass

_TRACE_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


@register_pass
class RemoveTraceAsserts(Pass):
    name = "remove_trace_asserts"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for node in list(graph.fx.nodes):
            if node.op == "call_function" and node.target in _TRACE_ASSERTS and not node.users:
                graph.fx.erase_node(node)
                removed += 1
        return PassResult(removed > 0, {"asserts": removed})
