"""prune_rows: only the rows that reach an output are computed, and the outputs stay eager's."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kiln
from kiln import zoo
from kiln.ir import trace
from kiln.passes import PassContext, PassManager

aten = torch.ops.aten
CLEANUP = ["remove_trace_asserts", "eliminate_dead_code", "fold_constants"]


def prune(model, *inputs):
    """The model traced, cleaned up and pruned; the prune_rows record; the eager reference."""
    torch.manual_seed(0)
    g = trace(model.eval(), inputs)
    records = PassManager([*CLEANUP, "prune_rows"]).run(g, PassContext())
    with torch.no_grad():
        ref = model(*inputs)
    return g, records[-1], ref


def rows(g, target, index=0) -> int:
    """Rows (axis 1; axis 0 for 2-D values) of the ``index``-th node calling ``target``."""
    shape = [n for n in g.nodes if n.target is target][index].meta["val"].shape
    return shape[0] if len(shape) == 2 else shape[1]


def check(g, ref, *inputs):
    # fp32 defaults: a GEMM over fewer rows may sum in another order
    torch.testing.assert_close(g(*inputs), ref)


class TokenHead(nn.Module):
    """MLP + norm over every token, then a head on token ``index`` (ViT-style classification)."""

    def __init__(self, index=0, h=16):
        super().__init__()
        self.up, self.down, self.norm, self.head = nn.Linear(h, 4 * h), nn.Linear(4 * h, h), nn.LayerNorm(h), nn.Linear(h, 3)
        self.index = index

    def forward(self, x):
        y = self.norm(x + self.down(F.gelu(self.up(x))))
        return self.head(y[:, self.index])


@pytest.mark.parametrize("index", [0, -1, 5])
def test_select_moves_up_to_the_input(index):
    x = torch.randn(2, 8, 16)
    g, rec, ref = prune(TokenHead(index), x)
    # layer_norm, add, linear (down), gelu, linear (up): every op before the select, on one row
    assert rec.stats == {"ops_narrowed": 5}
    assert rows(g, aten.linear.default, 0) == 1 and rows(g, aten.gelu.default) == 1
    assert rows(g, aten.layer_norm.default) == 1
    check(g, ref, x)


class Cumulative(nn.Module):
    """A cumulative sum mixes rows: everything above it needs every row."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.proj(x).cumsum(1))[:, -1]


def test_stops_at_an_op_that_mixes_rows():
    x = torch.randn(2, 8, 16)
    g, rec, ref = prune(Cumulative(), x)
    assert rec.stats == {"ops_narrowed": 1}  # relu only
    assert rows(g, aten.linear.default) == 8 and rows(g, aten.cumsum.default) == 8
    assert rows(g, aten.relu.default) == 1
    check(g, ref, x)


class ReadWhole(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        y = torch.tanh(self.proj(x))
        return y[:, 0], y.mean()


def test_value_read_whole_elsewhere_is_left_alone():
    x = torch.randn(2, 8, 16)
    g, rec, ref = prune(ReadWhole(), x)
    assert rec.modified is False and rec.stats == {"ops_narrowed": 0}
    assert rows(g, aten.tanh.default) == 8
    # the select went back to reading the whole value (no stray slice left behind)
    assert not [n for n in g.nodes if n.target is aten.slice.Tensor]
    check(g, ref, x)


class Attention(nn.Module):
    """Single-layer attention with a padding mask or a causal mask, then rows ``keep`` of the output."""

    def __init__(self, keep, causal=False, h=32, heads=4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.heads, self.keep, self.causal = heads, keep, causal

    def forward(self, x, mask):
        b, s, h = x.shape

        def split(t):
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           attn_mask=None if self.causal else mask, is_causal=self.causal)
        out = self.o(a.transpose(1, 2).reshape(b, s, h))
        return out[:, self.keep]


def _mask(b=2, s=8):
    mask = torch.ones(b, 1, s, s, dtype=torch.bool)
    mask[1, ..., s - 3:] = False  # the second row's last keys are padding
    return mask


def test_attention_narrows_queries_and_its_mask_not_keys():
    x, mask = torch.randn(2, 8, 32), _mask()
    g, rec, ref = prune(Attention(keep=-1), x, mask)
    assert [rows(g, aten.linear.default, i) for i in range(4)] == [1, 8, 8, 1]  # q, k, v, o
    sdpa = next(n for n in g.nodes if n.target is aten.scaled_dot_product_attention.default)
    query, key, _, attn_mask = sdpa.args[:4]
    assert query.meta["val"].shape[2] == 1 and key.meta["val"].shape[2] == 8
    assert attn_mask.meta["val"].shape[-2:] == (1, 8)
    check(g, ref, x, mask)


def test_causal_attention_is_crossed_only_from_row_zero():
    x, mask = torch.randn(2, 8, 32), _mask()
    g, rec, ref = prune(Attention(keep=-1, causal=True), x, mask)
    sdpa = next(n for n in g.nodes if n.target is aten.scaled_dot_product_attention.default)
    assert sdpa.meta["val"].shape[2] == 8  # the last row of a causal attention is not its row 0
    check(g, ref, x, mask)

    g, rec, ref = prune(Attention(keep=slice(0, 3), causal=True), x, mask)
    sdpa = next(n for n in g.nodes if n.target is aten.scaled_dot_product_attention.default)
    assert sdpa.meta["val"].shape[2] == 3
    check(g, ref, x, mask)


class Residual(nn.Module):
    """``h`` feeds both the residual and the MLP branch: both slices of it merge and move above it."""

    def __init__(self, h=16):
        super().__init__()
        self.embed, self.mlp, self.norm = nn.Linear(h, h), nn.Linear(h, h), nn.LayerNorm(h)

    def forward(self, x):
        h = self.embed(x)
        return (h + self.mlp(self.norm(h)))[:, 0]


def test_identical_slices_of_a_shared_value_merge():
    x = torch.randn(3, 8, 16)
    g, rec, ref = prune(Residual(), x)
    assert rows(g, aten.linear.default, 0) == 1  # the embedding projection too
    check(g, ref, x)


def test_vit_end_to_end_on_the_cpu_target():
    torch.manual_seed(0)
    model, inputs = zoo.vit()
    with torch.no_grad():
        ref = model(*inputs).logits
    cm = kiln.compile(model, inputs, target="cpu")
    (record,) = [p for p in cm.artifact.manifest["passes"] if p["name"] == "prune_rows"]
    assert record["stats"]["ops_narrowed"] > 10  # the last layer after its keys and values
    torch.testing.assert_close(cm(*inputs)[0], ref)


def test_bert_keeps_every_row_it_returns():
    torch.manual_seed(0)
    model, inputs = zoo.bert()
    g, rec, ref = prune(model, *inputs)
    assert rec.stats == {"ops_narrowed": 0}  # last_hidden_state is an output: nothing to prune
