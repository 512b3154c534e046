"""Capture an ``nn.Module`` into kiln's IR with torch.export.

torch.export (non-strict) runs the model's Python once and records ATen ops;
``run_decompositions({})`` then functionalizes the graph without decomposing
ops such as ``linear`` or ``scaled_dot_product_attention`` that backends want
to see whole. HF models that return a KV cache are traced with the cache turned
off (a whole-sequence forward), and a log line says so. HF MoE experts
modules are traced as one ``kiln::moe_experts`` op (``kiln.ir.moe``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

from ..errors import TraceError
from .graph import Graph, is_ir_target
from .printer import op_name
from .signature import InputSpec, Signature
from .meta import TensorType
from .moe import experts_as_kiln_ops, replace_foreign_grouped_mm

log = logging.getLogger("kiln")

_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def trace(model: torch.nn.Module, example_inputs, example_kwargs: dict | None = None,
          dynamic_shapes=None) -> Graph:
    """Trace ``model(*example_inputs, **example_kwargs)`` into a :class:`Graph`."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"kiln compiles torch.nn.Module objects; got {type(model).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    args, kwargs = _unaliased(model, args, kwargs)
    name = type(model).__name__
    tracker = _ModuleTracker(model)
    with kv_cache_disabled(model), experts_as_kiln_ops(model), tracker, torch_trace_logs_silenced(), \
            warnings.catch_warnings():
        # torch.export itself trips torch's own pytree deprecation; nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
        except Exception as e:
            where = f" in submodule '{tracker.innermost}'" if tracker.innermost else ""
            reason = str(e).strip().splitlines()
            reason = "\n".join(reason[:12]) if reason else type(e).__name__
            raise TraceError(f"torch.export could not trace {name}{where}: {type(e).__name__}: {reason}") from e
        ep = ep.run_decompositions({})
    replace_foreign_grouped_mm(ep.graph_module)
    return from_exported_program(ep, name)


def _unaliased(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example inputs with every tensor that shares memory with an earlier one (or a weight) cloned.

    torch.export specializes on aliasing it sees: given the same tensor as two
    inputs, it traces a graph that reads one placeholder for both (and ignores
    the other), which is wrong for every later call with two different tensors.
    A compiled program takes its inputs as independent values, so it is traced
    on independent copies.
    """
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten((args, kwargs))
    seen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta" and leaf.untyped_storage().nbytes():
            ptr = leaf.untyped_storage().data_ptr()
            if ptr in seen:
                leaf = leaf.clone()
                ptr = leaf.untyped_storage().data_ptr()
            seen.add(ptr)
        out.append(leaf)
    return pytree.tree_unflatten(out, spec)


def from_exported_program(ep: torch.export.ExportedProgram, name: str) -> Graph:
    weights: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    inputs: list[InputSpec] = []
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            if not isinstance(spec.arg, TensorArgument):
                raise TraceError(f"{name}: input {spec.arg} is not a tensor; kiln compiles tensor inputs only "
                                 "(pass Python values as constants inside the model)")
            inputs.append(InputSpec(spec.arg.name, TensorType.of(placeholders[spec.arg.name].meta["val"])))
        elif spec.kind in _WEIGHT_KINDS:
            value = ep.state_dict.get(spec.target)
            if value is None:
                value = ep.constants[spec.target]
            weights[spec.arg.name] = value.detach()
            sources[spec.arg.name] = spec.target
        else:
            raise TraceError(f"{name}: input {spec.arg} of kind {spec.kind.name} is not supported")
    for spec in ep.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise TraceError(f"{name}: forward mutates {spec.target!r} ({spec.kind.name}); kiln compiles "
                             "pure functions: pass state in and out as tensors")
    for node in ep.graph.nodes:
        if node.op in ("get_attr", "call_module") or (node.op == "call_function" and not is_ir_target(node.target)):
            what = node.target if node.op != "call_function" else op_name(node.target)
            raise TraceError(f"{name}: node {node.name} ({node.op} {what}) is not supported in kiln IR "
                             "(control flow and custom modules must trace to ATen ops)")
    gm = fx.GraphModule(torch.nn.Module(), ep.graph)
    sig = Signature(inputs, ep.call_spec.in_spec, ep.call_spec.out_spec)
    return Graph(gm, weights, sig, name, sources)


# What torch.export logs while it fails: fake tensors log the whole traceback of a failed
# meta kernel at ERROR (~20 lines for a shape mismatch), symbolic shapes a graph dump at
# WARNING. The exception itself reaches the user as a TraceError naming the submodule;
# the logs only repeat it, before it, in torch's own terms.
_TRACE_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes",
                  "torch.export", "torch._export")
_silenced_lock = threading.Lock()
_silenced_depth = 0  # traces running now (threads may compile at once): levels come back when the last ends
_saved_levels: dict[str, int] = {}


@contextlib.contextmanager
def torch_trace_logs_silenced():
    """Within the block, torch's fake-tensor, symbolic-shape and export loggers print nothing.

    Their levels are restored after the block. ``TORCH_LOGS`` set in the
    environment means someone is debugging torch itself: then nothing is silenced.
    """
    global _silenced_depth
    if os.environ.get("TORCH_LOGS"):
        yield
        return
    with _silenced_lock:
        if _silenced_depth == 0:
            for name in _TRACE_LOGGERS:
                logger = logging.getLogger(name)
                _saved_levels[name] = logger.level
                logger.setLevel(logging.CRITICAL + 1)
        _silenced_depth += 1
    try:
        yield
    finally:
        with _silenced_lock:
            _silenced_depth -= 1
            if _silenced_depth == 0:
                for name, level in _saved_levels.items():
                    logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def kv_cache_disabled(model: torch.nn.Module, announce: bool = True):
    """Within the block, an HF model with ``config.use_cache`` runs without its KV cache.

    The tracer uses it; so must anything that computes the eager reference of a traced model.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        yield
        return
    if announce:
        log.info("kiln: %s returns a KV cache by default; tracing it with config.use_cache=False "
                 "(a whole-sequence forward, no cache output)", type(model).__name__)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


class _ModuleTracker:
    """Keeps the stack of submodules being run, to name the one where tracing failed.

    Forward hooks without ``always_call`` do not fire when a forward raises, so
    after a failure the top of the stack is the innermost failing submodule.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.stack: list[str] = []
        self.handles = []

    @property
    def innermost(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def __enter__(self):
        for path, mod in self.model.named_modules():
            if path:
                self.handles.append(mod.register_forward_pre_hook(self._entering(path)))
                self.handles.append(mod.register_forward_hook(self._left))
        return self

    def _entering(self, path: str):
        def hook(_module, _args) -> None:
            self.stack.append(path)
        return hook

    def _left(self, _module, _args, _output) -> None:
        self.stack.pop()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False
