"""kiln's IR: an exported FX graph, its weights, its signature and typed node metadata.

The graph holds ATen-level ``call_function`` nodes between placeholders and one
output. Placeholders are either *weights* (parameters, buffers and constants,
kept in :attr:`Graph.weights` by placeholder name) or *user inputs* (listed in
the :class:`~kiln.ir.signature.Signature`). Passes edit ``graph.fx`` in place
through the helpers here, then call :meth:`Graph.propagate_types` so every node
carries its shape and dtype again.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import VerificationError
from .meta import META_KEY, NodeMeta, types_of
from .printer import op_name
from .serialize import is_python_target
from .signature import Signature


class Graph:
    def __init__(self, gm: fx.GraphModule, weights: dict[str, torch.Tensor], signature: Signature, name: str,
                 weight_sources: dict[str, str] | None = None):
        self.gm = gm
        self.weights = weights
        self.signature = signature
        self.name = name
        # placeholder name -> the model's own name for it (e.g. "model.layers.0.mlp.up_proj.weight")
        self.weight_sources = weight_sources or {}
        # Bit-width plans of nested-quantized linears (passes/quantize_nested.py): plan -> node -> bits.
        # Lowering makes one program per plan; empty: one program.
        self.plans: dict[str, dict[str, int]] = {}
        self.default_plan: str | None = None
        self.quantization: dict | None = None  # that pass's report (JSON), stored in the manifest
        for node in self.fx.nodes:
            if META_KEY not in node.meta:
                node.meta[META_KEY] = NodeMeta(types=types_of(node.meta.get("val")))

    # ---- structure -----------------------------------------------------------------
    @property
    def fx(self) -> fx.Graph:
        return self.gm.graph

    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.fx.nodes)

    def node(self, name: str) -> fx.Node:
        for n in self.fx.nodes:
            if n.name == name:
                return n
        raise KeyError(f"graph {self.name} has no node {name!r}")

    @staticmethod
    def meta(node: fx.Node) -> NodeMeta:
        return node.meta.setdefault(META_KEY, NodeMeta())

    def is_weight(self, node: fx.Node) -> bool:
        return node.op == "placeholder" and node.name in self.weights

    def input_nodes(self) -> list[fx.Node]:
        by_name = {n.name: n for n in self.fx.nodes if n.op == "placeholder"}
        return [by_name[i.name] for i in self.signature.inputs]

    def weight_nodes(self) -> list[fx.Node]:
        return [n for n in self.fx.nodes if self.is_weight(n)]

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.fx.nodes) if n.op == "output")

    def compute_nodes(self) -> list[fx.Node]:
        return [n for n in self.fx.nodes if n.op == "call_function"]

    def add_weight(self, name_hint: str, value: torch.Tensor, source: str | None = None) -> fx.Node:
        """A new weight placeholder holding ``value``, placed after the existing weights."""
        existing = {n.name for n in self.fx.nodes}
        name, i = name_hint, 0
        while name in existing:
            i += 1
            name = f"{name_hint}_{i}"
        placeholders = [n for n in self.fx.nodes if n.op == "placeholder"]
        anchor = next((n for n in placeholders if not self.is_weight(n)), None)
        ctx = self.fx.inserting_before(anchor) if anchor is not None else self.fx.inserting_after(placeholders[-1])
        with ctx:
            node = self.fx.placeholder(name)
        assert node.name == name, (node.name, name)
        value = value.detach()
        self.weights[name] = value
        if source:
            self.weight_sources[name] = source
        mode = self._fake_mode()
        if mode is not None:
            node.meta["val"] = mode.from_tensor(value, static_shapes=True)
        node.meta[META_KEY] = NodeMeta(types=types_of(value))
        return node

    def remove_weight(self, node: fx.Node) -> None:
        if node.users:
            raise VerificationError(f"cannot remove weight {node.name}: still used by {[u.name for u in node.users]}")
        self.fx.erase_node(node)
        del self.weights[node.name]
        self.weight_sources.pop(node.name, None)

    # ---- types ---------------------------------------------------------------------
    def _fake_mode(self):
        return detect_fake_mode([n.meta["val"] for n in self.fx.nodes if n.op == "placeholder" and "val" in n.meta])

    def propagate_types(self) -> None:
        """Recompute every node's ``val`` (fake tensor) and its kiln tensor types."""
        mode = self._fake_mode()
        if mode is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode()
        fake_args = []
        for n in self.fx.nodes:
            if n.op != "placeholder":
                continue
            if "val" not in n.meta:
                n.meta["val"] = mode.from_tensor(self.weights[n.name], static_shapes=True)
            fake_args.append(n.meta["val"])
        self.gm.recompile()
        FakeTensorProp(self.gm, mode).propagate_dont_convert_inputs(*fake_args)
        for n in self.fx.nodes:
            self.meta(n).types = types_of(n.meta.get("val"))

    # ---- running -------------------------------------------------------------------
    def placeholder_args(self, user_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        it = iter(user_inputs)
        return [self.weights[n.name] if n.name in self.weights else next(it)
                for n in self.fx.nodes if n.op == "placeholder"]

    def run(self, user_inputs: list[torch.Tensor]) -> list:
        """Run the graph eagerly (PyTorch kernels) on flat user inputs; returns flat outputs."""
        self.gm.recompile()
        with torch.no_grad():
            out = self.gm(*self.placeholder_args(user_inputs))
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def __call__(self, *args, **kwargs):
        return self.signature.unflatten(self.run(self.signature.flatten(args, kwargs)))

    # ---- copies and views ------------------------------------------------------------
    def copy(self) -> Graph:
        """A structural copy: new nodes and metadata, the same weight tensors."""
        new_fx = fx.Graph()
        out = new_fx.graph_copy(self.fx, {})
        new_fx.output(out)
        for old, new in zip(self.fx.nodes, new_fx.nodes):
            if META_KEY in old.meta:
                m = old.meta[META_KEY]
                new.meta[META_KEY] = NodeMeta(**{**m.__dict__, "rewritten_by": list(m.rewritten_by)})
        copy = Graph(fx.GraphModule(torch.nn.Module(), new_fx), dict(self.weights), self.signature, self.name,
                     dict(self.weight_sources))
        copy.plans = {name: dict(bits) for name, bits in self.plans.items()}
        copy.default_plan, copy.quantization = self.default_plan, self.quantization
        return copy

    def text(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    def to_networkx(self):
        from .views import to_networkx

        return to_networkx(self)

    # ---- checking ------------------------------------------------------------------
    def verify(self) -> None:
        """Raise :class:`VerificationError` if the graph is not well formed."""
        try:
            self.fx.lint()
        except Exception as e:
            raise VerificationError(f"graph {self.name} is malformed: {e}") from e
        placeholders = [n for n in self.fx.nodes if n.op == "placeholder"]
        users = [n.name for n in placeholders if n.name not in self.weights]
        expected = [i.name for i in self.signature.inputs]
        if users != expected:
            raise VerificationError(f"user-input placeholders {users} do not match the signature {expected}")
        names = {n.name for n in placeholders}
        stray = sorted(set(self.weights) - names)
        if stray:
            raise VerificationError(f"weights with no placeholder: {stray}")
        seen_non_placeholder = False
        for n in self.fx.nodes:
            if n.op == "placeholder":
                if seen_non_placeholder:
                    raise VerificationError(f"placeholder {n.name} comes after compute nodes")
                continue
            seen_non_placeholder = True
            if n.op not in ("call_function", "output"):
                raise VerificationError(f"node {n.name}: op kind {n.op!r} is not allowed in kiln IR")
            if n.op == "call_function" and not is_ir_target(n.target):
                raise VerificationError(f"node {n.name}: target {n.target!r} is not an op overload")
        for n in self.fx.nodes:
            meta = n.meta.get(META_KEY)
            if not isinstance(meta, NodeMeta):
                raise VerificationError(f"node {n.name} has no kiln metadata")
            if n.op in ("placeholder", "call_function") and "val" in n.meta:
                actual = types_of(n.meta["val"])
                if actual != meta.types:
                    raise VerificationError(
                        f"node {n.name}: metadata says {_fmt(meta.types)} but the value is {_fmt(actual)} "
                        "(a pass changed the graph without calling propagate_types)")
            elif n.op == "call_function" and _returns_values(n.target):
                raise VerificationError(f"node {n.name} ({op_name(n.target)}) has no shape/dtype: "
                                        "run propagate_types after rewriting")


def _returns_values(target) -> bool:
    return not isinstance(target, torch._ops.OpOverload) or len(target._schema.returns) > 0


def _fmt(types) -> str:
    return "none" if types is None else ", ".join(map(str, types))


def is_ir_target(target) -> bool:
    """Whether a ``call_function`` target may appear in kiln IR: any op overload, or an allowed Python operator."""
    return isinstance(target, torch._ops.OpOverload) or is_python_target(target)
