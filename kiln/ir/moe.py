"""Trace Hugging Face MoE experts modules as one ``kiln::moe_experts`` op.

transformers (>= 5) gives an MoE model's experts one module
(``MixtralExperts``, ``Qwen2MoeExperts``, ... built with
``@use_experts_implementation``) whose forward
``(hidden_states, top_k_index, top_k_weights)`` is picked at run time by
``config._experts_implementation``. None of the three traces to something a
backend can run well: ``"grouped_mm"`` (the default) exports as the opaque
custom op ``transformers::grouped_mm_fallback``, ``"eager"`` loops over a
data-dependent set of experts that torch.export refuses, and ``"batched_mm"``
gathers a weight matrix per (token, expert) pair (~26x slower than the
default at 512 wide).

So the module is recognised, not its traced ops: while the model is traced,
each experts module whose computation ``kiln::moe_experts`` defines (gated,
no biases, the default ``[gate; up]`` layout and gate function, an activation
it knows, not expert-parallel) runs that op on its own weights instead,
whichever implementation the config names. Recognising the module rather than
matching each form's 15-odd traced nodes in a pass catches all three forms
(one of which does not trace at all) and keeps the op's inputs named as the
module's parameters. Modules it does not recognise trace as they would have;
with the default implementation their ``transformers::grouped_mm_fallback``
nodes then become ``kiln::grouped_mm`` (the same computation,
:func:`replace_foreign_grouped_mm`), so the graph runs without transformers.
"""
from __future__ import annotations

import contextlib
import logging
import types

import torch
from torch import nn

from . import ops  # noqa: F401 - registers torch.ops.kiln

log = logging.getLogger("kiln")


def _activation(act) -> str | None:
    """The ``kiln::moe_experts`` name of an activation module, None if it is not one it takes."""
    cls = type(act).__name__
    if isinstance(act, nn.SiLU) or cls == "SiLUActivation":
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if cls == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    if cls in ("GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh"):
        return "gelu_tanh"
    return None


def _default_gate(module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    return getattr(type(module), "_apply_gate", None) is _default_apply_gate


def experts_activation(module: nn.Module) -> str | None:
    """The activation if ``module`` is an HF experts module ``kiln::moe_experts`` computes, else None."""
    if not hasattr(module, "_is_expert_parallel") or not hasattr(module, "config"):
        return None
    if not (getattr(module, "has_gate", False) and not getattr(module, "has_bias", True)
            and getattr(module, "is_concatenated", False) and not getattr(module, "has_post_expert_norm", True)
            and not module._is_expert_parallel):
        return None
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3):
        return None
    if not _default_gate(module):
        return None
    return _activation(getattr(module, "act_fn", None))


def _kiln_forward(activation: str):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return torch.ops.kiln.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj,
                                          self.down_proj, activation, bool(self.is_transposed))
    return forward


@contextlib.contextmanager
def experts_as_kiln_ops(model: nn.Module):
    """Within the block, ``model``'s recognised experts modules run ``kiln::moe_experts``."""
    patched = []
    for path, module in model.named_modules():
        activation = experts_activation(module)
        if activation is None:
            continue
        had = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        module.forward = types.MethodType(_kiln_forward(activation), module)
        patched.append((module, had, old))
        log.debug("kiln: %s (%s, experts_implementation=%r) traced as kiln::moe_experts", path,
                  type(module).__name__, getattr(module.config, "_experts_implementation", None))
    if patched:
        log.info("kiln: %s: %d MoE experts modules traced as kiln::moe_experts", type(model).__name__,
                 len(patched))
    try:
        yield
    finally:
        for module, had, old in patched:
            if had:
                module.forward = old
            else:
                del module.forward


def replace_foreign_grouped_mm(gm: torch.fx.GraphModule) -> int:
    """Retarget ``transformers::grouped_mm_fallback`` nodes to ``kiln::grouped_mm``; how many there were."""
    foreign = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and foreign is not None and node.target == getattr(foreign, "default", None):
            node.target = torch.ops.kiln.grouped_mm.default
            n += 1
    if n:
        gm.recompile()
    return n
