"""The JSON form of an FX graph of ATen ops, used inside kiln artifacts.

Documented in ``docs/artifact-format.md``. Loading never evaluates code and
never unpickles: op targets are resolved by name, ATen/prims ops through
``torch.ops`` and a fixed table of Python operators (used by symbolic-size
arithmetic); anything else is refused. An artifact's graph is data from disk,
so the ATen ops it may name are limited too (:func:`op_refusal`): functional
ops only, never file I/O or unchecked memory access. The ``torch`` backend
places only ops this admits, so kiln never writes a graph its loader refuses.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..errors import ArtifactError, KilnError
from .meta import dtype_from_name, dtype_name, types_of
from .collectives import is_collective
from .ops import is_kiln_op  # also registers kiln's ops, which graphs resolve by name

_OP_NAMESPACES = ("aten", "prims", "kiln", "_c10d_functional")
_PYTHON_TARGETS = {
    f"{mod}.{fn.__name__}": fn
    for mod, fns in {
        "operator": (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                     operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
                     operator.lt, operator.le, operator.gt, operator.ge),
        "torch": (torch.sym_max, torch.sym_min, torch.sym_float, torch.sym_int, torch.sym_not),
        "math": (math.ceil, math.floor, math.sqrt),
    }.items()
    for fn in fns
}
# Functional ATen ops that still reach outside the graph's own tensors, by reason:
# file and console I/O, and reads without bounds checks (``_reshape_alias`` takes any
# strides; the unsafe index ops and ``segment_reduce(unsafe=True)`` skip index checks).
_DENIED_OPS = {
    "it does file or console I/O": frozenset({"from_file", "save", "_print", "warn"}),
    "it reads memory without bounds checks": frozenset({
        "_reshape_alias", "_reshape_alias_copy", "_unsafe_index", "_unsafe_index_put", "_unsafe_masked_index",
        "_unsafe_masked_index_put_accumulate", "segment_reduce"}),
}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}


def is_python_target(target) -> bool:
    """Whether ``target`` is one of the Python operators kiln IR and artifacts allow."""
    return any(target is fn for fn in _PYTHON_TARGETS.values())


def op_refusal(target) -> str | None:
    """Why an artifact graph may not call ``target`` (None: it may).

    Admitted: the Python operators above, and ATen/prims ops (and kiln's own,
    ``kiln.ir.ops.OPS``: the ``kiln`` namespace is not a door for other code's ops;
    and the functional collectives of ``kiln.ir.collectives.COLLECTIVES``) whose schema
    is functional (no argument written in place or as ``out=``, so a graph
    never writes an input's, a weight's or a shared file's storage), that take
    no ``Storage`` and are not in ``_DENIED_OPS``. Random ops (and
    ``scaled_dot_product_attention``, tagged ``nondeterministic_seeded`` for its
    dropout) are admitted: they compute, they do not reach outside the graph.
    """
    if is_python_target(target):
        return None
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in _OP_NAMESPACES:
        return "not an ATen/prims/kiln op, a functional collective or a known Python operator"
    if target.namespace == "kiln" and not is_kiln_op(target):
        return "a kiln:: op that kiln itself does not register (kiln.ir.ops)"
    if target.namespace == "_c10d_functional" and not is_collective(target):
        return "a _c10d_functional op other than the collectives kiln admits (kiln.ir.collectives)"
    schema = target._schema
    if schema.is_mutable:
        return "it writes its arguments in place (artifact graphs are functional)"
    if any("Storage" in str(a.type) for a in schema.arguments):
        return "it takes a raw Storage"
    return next((reason for reason, ops in _DENIED_OPS.items() if target._opname in ops), None)


def target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    name = f"{getattr(target, '__module__', '').lstrip('_')}.{getattr(target, '__name__', '')}"
    if _PYTHON_TARGETS.get(name) is not target:
        raise KilnError(f"target {target!r} has no JSON form (only ATen/prims ops and basic operators do)")
    return name


def resolve_target(name: str):
    if name in _PYTHON_TARGETS:
        return _PYTHON_TARGETS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in _OP_NAMESPACES:
        raise ArtifactError(f"op {name!r} is not an ATen/prims/kiln op, a functional collective or a known Python operator")
    ns, op, overload = parts
    try:
        target = getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError):
        raise ArtifactError(f"op {name!r} does not exist in this torch ({torch.__version__})") from None
    refusal = op_refusal(target)
    if refusal:
        raise ArtifactError(f"op {name!r} is not allowed in an artifact graph: {refusal}")
    return target


def check_graph_ops(data: dict) -> None:
    """Resolve every op a JSON graph calls, raising ArtifactError naming the first node whose op is refused.

    The same check ``graph_from_json`` makes, without building the graph: an
    artifact is checked whole before any of its partitions is loaded.
    """
    for entry in data["nodes"]:
        if entry.get("op") == "call_function":
            _node_target(entry)


def _node_target(entry: dict):
    try:
        return resolve_target(entry["target"])
    except ArtifactError as e:
        raise ArtifactError(f"node {entry['name']}: {e}") from None


def graph_to_json(gm_or_graph) -> dict:
    graph = gm_or_graph.graph if isinstance(gm_or_graph, fx.GraphModule) else gm_or_graph
    nodes = []
    for n in graph.nodes:
        entry: dict = {"name": n.name, "op": n.op}
        try:
            if n.op == "call_function":
                entry["target"] = target_name(n.target)
            elif n.op not in ("placeholder", "output"):
                raise KilnError(f"op kind {n.op!r} has no JSON form")
            if n.args:
                entry["args"] = [_encode(a) for a in n.args]
            if n.kwargs:
                entry["kwargs"] = {k: _encode(v) for k, v in n.kwargs.items()}
        except KilnError as e:
            raise KilnError(f"cannot serialize node {n.name}: {e}") from None
        types = types_of(n.meta.get("val"))
        if types is not None:
            entry["types"] = [t.to_json() for t in types]
        nodes.append(entry)
    return {"nodes": nodes}


def graph_from_json(data: dict) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        name, op = entry["name"], entry["op"]
        args = tuple(_decode(a, env) for a in entry.get("args", ()))
        kwargs = {k: _decode(v, env) for k, v in entry.get("kwargs", {}).items()}
        if op == "placeholder":
            node = graph.placeholder(name)
        elif op == "call_function":
            node = graph.create_node("call_function", _node_target(entry), args, kwargs, name=name)
        elif op == "output":
            node = graph.output(args[0])
        else:
            raise ArtifactError(f"node {name}: op kind {op!r} is not allowed in an artifact graph")
        if node.name != name:
            raise ArtifactError(f"node name {name!r} is duplicated or invalid")
        if "types" in entry:
            node.meta["types"] = entry["types"]
        env[name] = node
    return fx.GraphModule(torch.nn.Module(), graph)


def _encode(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (list, tuple)):
        return [_encode(x) for x in a]
    if isinstance(a, torch.dtype):
        return {"dtype": dtype_name(a)}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    raise KilnError(f"argument {a!r} of type {type(a).__name__} has no JSON form")


def _decode(a, env: dict[str, fx.Node]):
    if isinstance(a, list):
        return [_decode(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    (kind, value), = a.items()
    try:
        if kind == "node":
            return env[value]
        if kind == "float":
            return float(value)
        if kind == "dtype":
            return dtype_from_name(value)
        if kind == "device":
            return torch.device(value)
        if kind == "layout":
            return _LAYOUTS[value]
        if kind == "memory_format":
            return _MEMORY_FORMATS[value]
    except (KeyError, ValueError, RuntimeError) as e:  # RuntimeError: torch.device of a bad name
        raise ArtifactError(f"bad {kind} argument {value!r} in artifact graph: {e}") from None
    raise ArtifactError(f"unknown argument kind {kind!r} in artifact graph")
