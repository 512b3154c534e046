"""The calling convention of a compiled model: how user arguments map to graph inputs.

Shared by the compiler's :class:`~kiln.ir.graph.Graph` and the runtime's
executor, so both flatten arguments, check them and rebuild outputs the same way.
Specs serialize with torch's own pytree JSON form (never pickle).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from ..errors import ArtifactError, InputMismatchError
from .meta import TensorType

# Output containers that live in these packages are imported on load so their
# pytree registration exists; nothing outside them is ever imported by name.
_IMPORTABLE_OUTPUT_PACKAGES = ("transformers.",)


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: TensorType


@dataclass
class Signature:
    inputs: list[InputSpec]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """User arguments -> the flat list of graph inputs, checked against the compiled types."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise InputMismatchError(
                "arguments do not have the structure the model was compiled with:\n"
                f"  expected {_describe(self.in_spec)}\n  got      {_describe(spec)}"
            )
        problems = []
        bound: dict[str, int] = {}
        for spec_i, value in zip(self.inputs, leaves):
            if not isinstance(value, torch.Tensor):
                problems.append(f"  {spec_i.name}: expected a tensor {spec_i.type}, got {type(value).__name__}")
                continue
            got = TensorType.of(value)
            if got.dtype != spec_i.type.dtype or not _shape_matches(spec_i.type.shape, got.shape, bound):
                problems.append(f"  {spec_i.name}: expected {spec_i.type}, got {got}")
        if problems:
            raise InputMismatchError(
                "inputs differ from what the model was compiled for "
                "(compile with dynamic_shapes to allow other sizes):\n" + "\n".join(problems)
            )
        return leaves

    def unflatten(self, outputs) -> object:
        return pytree.tree_unflatten(list(outputs), self.out_spec)

    def to_json(self) -> dict:
        return {
            "inputs": [{"name": i.name, **i.type.to_json()} for i in self.inputs],
            "in_spec": pytree.treespec_dumps(self.in_spec),
            "out_spec": pytree.treespec_dumps(self.out_spec),
        }

    @classmethod
    def from_json(cls, data: dict) -> Signature:
        return cls(
            inputs=[InputSpec(i["name"], TensorType.from_json(i)) for i in data["inputs"]],
            in_spec=_load_treespec(data["in_spec"]),
            out_spec=_load_treespec(data["out_spec"]),
        )


def _shape_matches(expected, got, bound: dict[str, int]) -> bool:
    if len(expected) != len(got):
        return False
    for e, g in zip(expected, got):
        if isinstance(e, int):
            if e != g:
                return False
        elif e.isidentifier():  # a dynamic dim: any size, but the same everywhere it appears
            if bound.setdefault(e, g) != g:
                return False
    return True


def _describe(spec: pytree.TreeSpec) -> str:
    """``(args..., key=...)`` with ``T`` for each tensor/leaf, e.g. ``(T, [T, T], mask=T)``."""
    args, kwargs = spec.children_specs
    parts = [_describe_node(c) for c in args.children_specs]
    parts += [f"{k}={_describe_node(c)}" for k, c in zip(kwargs.context or [], kwargs.children_specs)]
    return "(" + ", ".join(parts) + ")"


def _describe_node(spec: pytree.TreeSpec) -> str:
    if spec.is_leaf():
        return "T"
    children = [_describe_node(c) for c in spec.children_specs]
    if spec.type is tuple:
        return "(" + ", ".join(children) + ("," if len(children) == 1 else "") + ")"
    if spec.type is list:
        return "[" + ", ".join(children) + "]"
    if spec.type is dict:
        return "{" + ", ".join(f"{k!r}: {c}" for k, c in zip(spec.context, children)) + "}"
    if spec.type is type(None):
        return "None"
    return f"{getattr(spec.type, '__name__', spec.type)}(" + ", ".join(children) + ")"


def _load_treespec(text: str) -> pytree.TreeSpec:
    try:
        return pytree.treespec_loads(text)
    except Exception as first:
        # An output container (e.g. a transformers ModelOutput) registers itself with
        # pytree when its module is imported: import that module, then try again.
        for name in _type_names(text):
            if name.startswith(_IMPORTABLE_OUTPUT_PACKAGES):
                try:
                    importlib.import_module(name.rsplit(".", 1)[0])
                except ImportError as e:
                    raise ArtifactError(f"the model's outputs are {name}, which needs {e.name} installed") from e
        try:
            return pytree.treespec_loads(text)
        except Exception:
            raise ArtifactError(f"cannot rebuild the output structure: {first}") from first


def _type_names(text: str) -> list[str]:
    import json

    names: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                names.append(node["type"])
            for child in node.get("children_spec", []):
                walk(child)

    try:
        data = json.loads(text)
        walk(data[1] if isinstance(data, list) and len(data) == 2 else data)
    except (TypeError, ValueError, RecursionError):  # malformed: treespec_loads' own error is the one to report
        pass
    return names

