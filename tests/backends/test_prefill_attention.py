"""kiln.backends.cpu.attention: prefill attention (query rows a multiple of 4, D up to 32) as a TVM kernel, with an
optional bool or fp32 mask, and eager's result wherever an input, a score or a masked row is not finite."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.backends.cpu import attention as A
from kiln.backends.cpu import lowbit

from attention_checks import check_not_taken, common_case, kernels as _kernels, same as _same


def _run(q, k, v, mask=None, scale=None):
    """The kernel on q, k, v (and an fp32 additive mask) as the compiled library calls it."""
    b, h, l, d = q.shape
    s = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    strides = (4, *q.stride(), *k.stride(), *v.stride())
    func = A.prefill_attention_func(b, h, l, s, d, (1 / d ** 0.5) if scale is None else scale,
                                    () if mask is None else tuple(mask.shape), 0.0 if scale is None else scale,
                                    strides).with_attr("global_symbol", "main")
    kernel = lowbit.build(func.with_attr("kiln.lowbit_params", ["q", "k", "v", "mask", "out"]))
    return kernel(q, k, v, torch.zeros(1, 1, 1, s) if mask is None else mask.contiguous(), torch.empty(b, h, l, d))


@pytest.mark.parametrize("b, h, l, s, d, scale", [(1, 12, 128, 128, 32, None), (2, 3, 8, 16, 16, 0.3),
                                                   (1, 2, 12, 48, 32, None), (1, 1, 4, 16, 16, 2.0)])
@pytest.mark.parametrize("mask_shape", [None, "b11s", "11ls", "bhls"])
def test_kernel_matches_eagers_attention_on_finite_inputs(b, h, l, s, d, scale, mask_shape, fallbacks):
    torch.manual_seed(l + s)
    q, k, v = torch.randn(b, h, l, d) * 2, torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    mask = None
    if mask_shape is not None:
        shape = {"b11s": (b, 1, 1, s), "11ls": (1, 1, l, s), "bhls": (b, h, l, s)}[mask_shape]
        mask = torch.randn(shape)
        mask.view(-1)[::3] = -float("inf")  # masked keys (none of the rows all masked: every third one)
        mask[..., 1] = 0.5
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    torch.testing.assert_close(_run(q, k, v, mask, scale), want, rtol=4e-6, atol=4e-6)  # fp32 rounding, fast exp
    assert fallbacks == []


@pytest.mark.parametrize("where", ["q", "k", "v", "mask"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_input_gets_eagers_attention(where, value, fallbacks):
    torch.manual_seed(0)
    x = {"q": torch.randn(1, 4, 8, 16), "k": torch.randn(1, 4, 16, 16), "v": torch.randn(1, 4, 16, 16),
         "mask": torch.zeros(1, 1, 8, 16)}
    x[where].view(-1)[37] = value
    got = _run(x["q"], x["k"], x["v"], x["mask"])
    want = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["mask"])
    assert len(fallbacks) == 1 and _same(got, want)


def test_a_row_with_every_key_masked_and_overflowing_scores_get_eagers_attention(fallbacks):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    mask = torch.zeros(1, 1, 4, 16)
    mask[0, 0, 2] = -float("inf")
    got = _run(q, k, v, mask)
    assert len(fallbacks) == 1 and _same(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    q, k = torch.full((1, 1, 4, 16), 1e30), torch.full((1, 1, 16, 16), 1e30)
    got = _run(q, k, v[:, :1])
    assert len(fallbacks) == 2 and _same(got, F.scaled_dot_product_attention(q, k, v[:, :1]))


def test_a_masked_key_weighs_exactly_nothing(fallbacks):
    """A masked score's exponential is exactly 0 (the fast exponential's clamp): times a huge v, still nothing."""
    q, k = torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 16, 16)
    v = torch.ones(1, 1, 16, 16)
    v[0, 0, 3] = 3e38
    mask = torch.zeros(1, 1, 1, 16)
    mask[..., 3] = -float("inf")
    got = _run(q, k, v, mask)
    assert fallbacks == [] and torch.equal(got, torch.ones(1, 1, 4, 16))


class _Encoder(torch.nn.Module):
    """Attention as an encoder writes it: heads split from [B, L, H*D] projections, a padding mask."""

    def __init__(self, heads: int, masked: bool):
        super().__init__()
        self.heads, self.masked = heads, masked

    def forward(self, x, pad):
        b, l, w = x.shape
        q, k, v = (t.view(b, l, self.heads, -1).transpose(1, 2) for t in (x, x * 0.5, x + 1))
        mask = pad[:, None, None, :].bool() if self.masked else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, l, w)


@pytest.mark.parametrize("masked", [False, True])
def test_a_compiled_encoder_runs_the_kernel_and_matches_eager_finite_and_not(masked):
    torch.manual_seed(0)
    x, pad = torch.randn(2, 32, 128), torch.ones(2, 32, dtype=torch.int64)
    pad[1, 20:] = 0
    model = _Encoder(4, masked)
    cm = kiln.compile(model, (x, pad))
    assert any(name.startswith("kiln_prefill_attention") for name in _kernels(cm)), _kernels(cm)
    torch.testing.assert_close(cm(x, pad), model(x, pad), rtol=4e-6, atol=4e-6)
    for index, value in (((0, 3, 5), float("nan")), ((1, 7, 100), float("inf")), ((0, 0, 0), 1e38)):
        xx = x.clone()
        xx[index] = value
        assert _same(cm(xx, pad), model(xx, pad)), (index, value)
    if masked:  # a row of the batch with every key masked: eager's result (NaN or not) there
        pad0 = pad.clone()
        pad0[0] = 0
        assert _same(cm(x, pad0), model(x, pad0))


@pytest.mark.parametrize("case", ["one query row", "rows not a multiple of 4", "keys not a multiple of 16",
                                  "D of 64", "causal", "gqa", "bf16", "a 2-D mask"])
def test_what_the_kernel_does_not_take(case):
    q, k, v = torch.randn(1, 4, 8, 32), torch.randn(1, 4, 16, 32), torch.randn(1, 4, 16, 32)
    kwargs = {}
    if case == "one query row":
        q = q[:, :, :1]
    elif case == "rows not a multiple of 4":
        q = q[:, :, :6]
    elif case == "keys not a multiple of 16":
        k, v = k[:, :, :9], v[:, :, :9]
    elif case == "D of 64":
        q, k, v = (torch.cat([t, t], -1) for t in (q, k, v))
    elif case in ("causal", "gqa", "bf16"):
        q, k, v = common_case(case, q, k, v, kwargs)
    else:
        kwargs["attn_mask"] = torch.zeros(8, 16)

    check_not_taken(q, k, v, kwargs, A.prefills, "kiln_prefill_attention", 1e-2 if case == "bf16" else 4e-6)


def test_random_prefill_attention_against_eager(fallbacks):
    """A differential run of the kernel over random shapes, scales, masks (fp32 with -inf, or none) and non-finite
    or huge values in q, k, v or the mask: finite cases within fp32 rounding, the rest bitwise eager's."""
    gen = torch.Generator().manual_seed(21)
    specials = [float("nan"), float("inf"), float("-inf"), 1e38, -3e38]

    def pick(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=gen))

    for case in range(40):
        b, h, l, s, d = 1 + pick(2), 1 + pick(4), 4 * (1 + pick(6)), 16 * (1 + pick(4)), 16 * (1 + pick(2))
        scale = None if case % 3 else float(torch.rand(1, generator=gen)) * 2
        x = {"q": torch.randn(b, h, l, d, generator=gen), "k": torch.randn(b, h, s, d, generator=gen),
             "v": torch.randn(b, h, s, d, generator=gen)}
        if case % 2:
            shape = [(b, 1, 1, s), (1, 1, l, s), (b, h, l, s)][pick(3)]
            x["mask"] = torch.randn(shape, generator=gen)
            x["mask"].view(-1)[torch.rand(x["mask"].numel(), generator=gen) < 0.3] = -float("inf")
        for _ in range(pick(3)):
            flat = x[list(x)[pick(len(x))]].view(-1)
            flat[pick(flat.numel())] = specials[pick(len(specials))]
        got = _run(x["q"], x["k"], x["v"], x.get("mask"), scale)
        want = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x.get("mask"), scale=scale)
        finite_inputs = all(torch.isfinite(t).all() for n, t in x.items() if n != "mask")
        if finite_inputs and "mask" not in x and torch.isfinite(want).all():
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=f"case {case}")
        elif torch.isfinite(want).all() and torch.isfinite(got).all() and finite_inputs:
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=f"case {case}")  # masked, no row empty
        else:
            assert _same(got, want), f"case {case}: {b, h, l, s, d, scale}"
    assert 0 < len(fallbacks) < 40  # both paths ran
