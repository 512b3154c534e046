"""Shared by the attention tests: equality with NaN in the same places, the kernels' names in a compiled model,
and a check that a call the cpu target's attention kernels do not take still compiles and matches eager."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kiln
from kiln.backends.cpu import attention as A


def same(a, b) -> bool:
    """``a`` and ``b`` equal bitwise, NaN where the other has NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(b, 7.0))


def kernels(cm) -> list[str]:
    """The TVM kernels of every task of a compiled model."""
    return [k["name"] for p in cm.manifest["programs"].values() for t in p["tasks"]
            for k in t["report"].get("kernels", [])]


def check_not_taken(q, k, v, kwargs: dict, taken, prefix: str, tol: float) -> None:
    """``sdpa(q, k, v, **kwargs)``: ``taken(node)`` is false for it, no kernel named ``prefix*`` is compiled, and
    the compiled model matches eager within ``tol``."""

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    gm = torch.export.export(M(), (q, k, v)).graph_module
    node = next(n for n in gm.graph.nodes if n.target is A.SDPA)
    assert not taken(node)
    cm = kiln.compile(M(), (q, k, v))
    assert not any(name.startswith(prefix) for name in kernels(cm))
    torch.testing.assert_close(cm(q, k, v), M()(q, k, v), rtol=tol, atol=tol)


def common_case(case: str, q, k, v, kwargs: dict):
    """The variants both kernels refuse: ``causal``, ``gqa`` (half the key heads), ``bf16``; ``(q, k, v)`` after it
    (``kwargs`` updated), or None for another case."""
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "gqa":
        k, v, kwargs["enable_gqa"] = k[:, :2], v[:, :2], True
    elif case == "bf16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    else:
        return None
    return q, k, v
