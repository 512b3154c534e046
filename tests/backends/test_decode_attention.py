"""kiln.backends.cpu.attention: decode attention (one query row) as a TVM kernel, with eager's result wherever an
input or a score is not finite."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.backends.cpu import attention as A
from kiln.backends.cpu import lowbit

from attention_checks import check_not_taken, common_case, kernels as _kernels, same as _same


def _run(q, k, v, scale=None):
    b, h, s, d = k.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    strides = (4, *q.stride(), *k.stride(), *v.stride())
    func = A.decode_attention_func(b, h, s, d, (1 / d ** 0.5) if scale is None else scale,
                                   0.0 if scale is None else scale, strides).with_attr("global_symbol", "main")
    kernel = lowbit.build(func.with_attr("kiln.lowbit_params", ["q", "k", "v", "out"]))
    return kernel(q, k, v, torch.empty(b, h, 1, d))


@pytest.mark.parametrize("b, h, s, d, scale", [(1, 16, 65, 128, None), (2, 3, 1, 16, 0.3), (1, 4, 300, 64, None)])
def test_kernel_matches_eagers_attention_on_finite_inputs(b, h, s, d, scale, fallbacks):
    torch.manual_seed(s)
    q, k, v = torch.randn(b, h, 1, d) * 2, torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    want = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(_run(q, k, v, scale), want, rtol=2e-6, atol=2e-6)  # fp32 rounding, another order
    assert fallbacks == []


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_input_gets_eagers_attention(where, value, fallbacks):
    torch.manual_seed(0)
    x = {"q": torch.randn(1, 4, 1, 16), "k": torch.randn(1, 4, 7, 16), "v": torch.randn(1, 4, 7, 16)}
    x[where][0, 2, 0, 5] = value
    got = _run(x["q"], x["k"], x["v"])
    assert len(fallbacks) == 1 and _same(got, F.scaled_dot_product_attention(x["q"], x["k"], x["v"]))


def test_scores_that_overflow_get_eagers_attention(fallbacks):
    q, k, v = torch.full((1, 1, 1, 16), 1e30), torch.full((1, 1, 3, 16), 1e30), torch.randn(1, 1, 3, 16)
    got = _run(q, k, v)
    assert len(fallbacks) == 1 and _same(got, F.scaled_dot_product_attention(q, k, v))


class _Step(torch.nn.Module):
    """A decode step's attention as a model writes it: the new token's q from a [B, 1, H, D] projection."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v).transpose(1, 2).reshape(q.shape[0], 1, -1)


def _compiled(example):
    cm = kiln.compile(_Step(), example)
    kernels = _kernels(cm)
    assert any(name.startswith("kiln_decode_attention") for name in kernels), kernels
    return cm


def test_compiled_decode_attention_matches_eager_finite_and_not():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 32), torch.randn(1, 4, 9, 32), torch.randn(1, 4, 9, 32)
    cm = _compiled((q, k, v))
    torch.testing.assert_close(cm(q, k, v), _Step()(q, k, v), rtol=2e-6, atol=2e-6)
    for name, index, value in (("k", (0, 1, 3, 2), float("nan")), ("v", (0, 3, 8, 0), float("inf")),
                               ("q", (0, 0, 2, 7), float("-inf")), ("k", (0, 0, 0), 1e38)):
        x = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        x[name][index] = value
        if value == 1e38:  # finite inputs, a score that overflows: eager's result too
            x["q"][0, 0, 0] = 10.0
        got, want = cm(x["q"], x["k"], x["v"]), _Step()(x["q"], x["k"], x["v"])
        assert _same(got, want), (name, value)


@pytest.mark.parametrize("case", ["two query rows", "mask", "causal", "gqa", "bf16", "D not a multiple of 16"])
def test_what_the_kernel_does_not_take(case):
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 4, 9, 32), torch.randn(1, 4, 9, 32)
    kwargs = {}
    if case == "two query rows":
        q = torch.randn(1, 4, 2, 32)
    elif case == "mask":
        kwargs["attn_mask"] = torch.ones(1, 9, dtype=torch.bool)
    elif case in ("causal", "gqa", "bf16"):
        q, k, v = common_case(case, q, k, v, kwargs)
    else:
        q, k, v = q[..., :24], k[..., :24], v[..., :24]

    check_not_taken(q, k, v, kwargs, A.decodes, "kiln_decode_attention", 1e-2 if case == "bf16" else 2e-6)


def test_random_decode_attention_against_eager():
    """A differential run over random shapes, scales and non-finite or huge values in q, k or v (the fuzzer's own
    attention rarely draws one query row of a width the kernel takes): finite cases within fp32 rounding, the
    rest bitwise eager's."""
    gen = torch.Generator().manual_seed(12)
    specials = [float("nan"), float("inf"), float("-inf"), 1e38, -3e38]
    for case in range(40):
        b, h = (int(torch.randint(1, n, (1,), generator=gen)) for n in (3, 5))
        s, d = int(torch.randint(1, 40, (1,), generator=gen)), 16 * int(torch.randint(1, 5, (1,), generator=gen))
        scale = None if case % 3 else float(torch.rand(1, generator=gen)) * 2
        x = {"q": torch.randn(b, 1, h, d, generator=gen), "k": torch.randn(b, h, s, d, generator=gen),
             "v": torch.randn(b, h, s, d, generator=gen)}
        for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
            name = ["q", "k", "v"][int(torch.randint(0, 3, (1,), generator=gen))]
            flat = x[name].view(-1)
            flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = specials[
                int(torch.randint(0, len(specials), (1,), generator=gen))]

        class M(torch.nn.Module):
            def __init__(self, scale):
                super().__init__()
                self.scale = scale

            def forward(self, q, k, v):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, scale=self.scale)

        example = (torch.randn(b, 1, h, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d))
        cm = kiln.compile(M(scale), example)
        got, want = cm(x["q"], x["k"], x["v"]), M(scale)(x["q"], x["k"], x["v"])
        if all(torch.isfinite(t).all() for t in x.values()) and torch.isfinite(want).all():
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=f"case {case}")
        else:
            assert _same(got, want), f"case {case}: {b, h, s, d, scale}"
