"""Deterministic text form of a :class:`~kiln.ir.graph.Graph`.

One line per node: ``%name: type = op(args) {annotations}``. Weights are listed
in a header with their types; nothing depends on memory addresses, dict order
of the run, or timing, so two prints of equal graphs are equal strings (golden
tests compare them).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .meta import NodeMeta, META_KEY, dtype_name


def print_graph(graph) -> str:
    lines = []
    ins = ", ".join(f"%{i.name}: {i.type}" for i in graph.signature.inputs)
    lines.append(f"graph {graph.name}({ins}) {{")
    for n in graph.weight_nodes():
        lines.append(f"  weight %{n.name}: {_types(n)}")
    for n in graph.fx.nodes:
        if n.op == "call_function":
            lines.append(f"  {format_node(n)}")
        elif n.op == "output":
            lines.append(f"  return {format_arg(n.args[0])}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_node(n: fx.Node) -> str:
    args = [format_arg(a) for a in n.args] + [f"{k}={format_arg(v)}" for k, v in n.kwargs.items()]
    meta: NodeMeta | None = n.meta.get(META_KEY)
    notes = ""
    if meta is not None:
        ann = meta.annotations()
        if ann:
            notes = "  {" + ", ".join(f"{k}={v}" for k, v in ann.items()) + "}"
    lhs = f"%{n.name}: {_types(n)}"
    return f"{lhs} = {op_name(n.target)}({', '.join(args)}){notes}"


def op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
        return name[: -len(".default")] if name.endswith(".default") else name
    return f"{getattr(target, '__module__', '').lstrip('_')}.{getattr(target, '__name__', target)}"


def _types(n: fx.Node) -> str:
    meta: NodeMeta | None = n.meta.get(META_KEY)
    if meta is None or meta.types is None:
        return "()"
    if len(meta.types) == 1:
        return str(meta.types[0])
    return "(" + ", ".join(map(str, meta.types)) + ")"


def format_arg(a) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(format_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return dtype_name(a)
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, torch.device):
        return str(a)
    return str(a)
