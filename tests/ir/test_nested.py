"""The nested weight form: its plane layout, each view's error against the float weight, its bytes."""
import pytest
import torch

from kiln import zoo
from kiln.ir import nested
from kiln.ir.nested import PLANES_OF, encode, pack_planes, unpack_codes, view_error

# Stated bounds on each view's relative RMS error (||W_b - W|| / ||W||), group 128.
BOUNDS = {8: 0.01, 4: 0.15, 2: 0.45}


def _rtn_error(w: torch.Tensor, bits: int, group: int = 128) -> float:
    """Plain per-group min/max round-to-nearest at ``bits``, for comparison."""
    g = w.reshape(-1, group)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    step = (hi - lo) / (2 ** bits - 1)
    back = ((g - lo) / step).round() * step + lo
    return ((back - g).pow(2).mean().sqrt() / g.pow(2).mean().sqrt()).item()


def test_planes_hold_the_codes_where_the_layout_says():
    torch.manual_seed(0)
    q = torch.randint(0, 256, (3, 256), dtype=torch.uint8)
    planes = pack_planes(q)
    assert {k: tuple(v.shape) for k, v in planes.items()} == {"hi": (3, 64), "mid": (3, 64), "lo": (3, 128)}
    for n, g, i, j in [(0, 0, 0, 0), (1, 1, 3, 31), (2, 0, 2, 7), (0, 1, 1, 5)]:
        k = 128 * g + 32 * i + j
        assert (int(planes["hi"][n, 32 * g + j]) >> (2 * i)) & 3 == int(q[n, k]) >> 6
        assert (int(planes["mid"][n, 32 * g + j]) >> (2 * i)) & 3 == (int(q[n, k]) >> 4) & 3
    for n, g, i, j in [(0, 0, 0, 0), (1, 1, 1, 63), (2, 0, 1, 10)]:
        assert (int(planes["lo"][n, 64 * g + j]) >> (4 * i)) & 15 == int(q[n, 128 * g + 64 * i + j]) & 15
    for bits in (8, 4, 2):
        only = {p: planes[p] for p in PLANES_OF[bits]}  # each view decodes from its own planes alone
        assert torch.equal(unpack_codes(only, bits), q.to(torch.int32) >> (8 - bits))


@pytest.mark.parametrize("source", ["random", "trained"])
def test_every_view_dequantizes_within_its_bound_and_beats_plain_rounding_at_2_bits(source):
    if source == "random":
        torch.manual_seed(0)
        weights = [torch.randn(256, 512) * 0.02]
    else:  # all-MiniLM-L6-v2's trained linear weights (the zoo's minilm ships them)
        model, _ = zoo.minilm()
        weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)][:6]
    for w in weights:
        form = encode(w)
        for bits, bound in BOUNDS.items():
            err = view_error(w, form, bits)
            assert err["rel_rms"] <= bound, (source, bits, err)
        # The 2-bit view sliced from the 8-bit codes, with its own fitted step, beats plain 2-bit rounding.
        assert view_error(w, form, 2)["rel_rms"] < _rtn_error(w, 2)


def test_nested_bytes_are_within_1_05x_of_the_8_bit_codes_and_parameters_alone():
    w = torch.randn(512, 1024)
    form = encode(w)
    eight_alone = w.numel() + 2 * 2 * w.numel() // 128  # codes + fp16 step and zero point per group
    assert form.nbytes() <= 1.05 * eight_alone
    assert form.nbytes(2) < form.nbytes(4) < form.nbytes(8) <= form.nbytes()
    for views in [(8, 4, 2), (4, 2), (8, 2), (2,)]:  # what held_bytes predicts is what encode holds
        assert nested.held_bytes(512, 1024, 128, views) == encode(w, views=views).nbytes()
    kept = form.keeping((4, 2))  # the same codes, fewer views: what encode(views=(4, 2)) holds
    assert set(kept.planes) == {"hi", "mid"} and kept.nbytes() == encode(w, views=(4, 2)).nbytes()
    assert torch.equal(kept.dequantize(2), form.dequantize(2))
    low = encode(w, views=(4, 2))  # a form serving only 4 and 2 bits holds no lo plane
    assert set(low.planes) == {"hi", "mid"} and low.views == (4, 2)
    assert low.nbytes() < 0.56 * w.numel()
    with pytest.raises(ValueError, match=r"holds the views \(4, 2\), not 8 bits"):
        low.dequantize(8)


@pytest.mark.parametrize("w, message", [
    (torch.randn(4, 100), "multiple of 128 that divides the 100 inputs"),
    (torch.randn(4, 128, 2), "2-d"),
    (torch.full((4, 128), float("nan")), "NaN or infinite"),
])
def test_encode_refuses_what_the_layout_cannot_hold(w, message):
    with pytest.raises(ValueError, match=message):
        encode(w)


def test_zero_and_constant_groups_come_back_exactly():
    w = torch.zeros(2, 256)
    w[1, 128:] = 0.5  # a constant group: the grid spans [0, 0.5]
    form = encode(w)
    for bits in (8, 4, 2):
        assert torch.allclose(form.dequantize(bits), w, atol=1e-3), bits
    assert nested.view_zero(torch.tensor([0.0]), 8).item() == 0.0
