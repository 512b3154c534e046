"""Region analysis on the zoo's exported graphs and on small hand-written models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln import zoo
from kiln.ir.regions import find_regions, node_roles

aten = torch.ops.aten
PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
               torch.ops.kiln.moe_experts.default}
NORMS = {aten.rsqrt.default, aten.layer_norm.default}  # one rsqrt per RMSNorm, one layer_norm per LayerNorm

# Per model: layer container, attention child, FFN children, projections per layer
# in attention / FFN (GPT-2 fuses q/k/v into one Conv1D; Mixtral's FFN is the
# router linear and the experts' kiln::moe_experts), norms per layer in (attention, ffn, other).
LAYOUT = {
    "llama": ("model.layers", "self_attn", ("mlp",), 4, 3, (0, 0, 2)),
    "qwen2": ("model.layers", "self_attn", ("mlp",), 4, 3, (0, 0, 2)),
    "mixtral": ("model.layers", "self_attn", ("mlp",), 4, 2, (0, 0, 2)),
    "gpt2": ("transformer.h", "attn", ("mlp",), 2, 2, (0, 0, 2)),
    "vit": ("vit.layers", "attention", ("mlp",), 4, 2, (0, 0, 2)),
    # Post-norm: the residual add and LayerNorm live in BertSelfOutput / BertOutput.
    "bert": ("encoder.layer", "attention", ("intermediate", "output"), 4, 2, (1, 1, 0)),
    "minilm": ("encoder.layer", "attention", ("intermediate", "output"), 4, 2, (1, 1, 0)),
}
assert LAYOUT.keys() == zoo.MODELS.keys()


def _paths(node: torch.fx.Node) -> set[str]:
    return {path for path, _ in (node.meta.get("nn_module_stack") or {}).values()}


def _ops(gm: torch.fx.GraphModule, names, targets) -> list[str]:
    names = set(names)
    return [n.name for n in gm.graph.nodes if n.name in names and n.target in targets]


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_layers_are_the_models_blocks(exported, name):
    model, _, gm = exported(name)
    container, attn, ffn, *_ = LAYOUT[name]
    regions = find_regions(gm)

    assert len(regions) == model.config.num_hidden_layers
    for i, region in enumerate(regions):
        path = f"{container}.{i}"
        assert (region.index, region.path) == (i, path)
        assert region.module_type == type(model.get_submodule(path)).__name__
        assert region.attention_path == f"{path}.{attn}"
        assert region.ffn_paths == tuple(f"{path}.{child}" for child in ffn)


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_every_node_of_a_layer_is_in_its_region(exported, name):
    _, _, gm = exported(name)
    roles = node_roles(find_regions(gm))
    container = LAYOUT[name][0]
    for node in gm.graph.nodes:
        layers = [p for p in _paths(node) if p.rpartition(".")[0] == container]
        if node.op in ("placeholder", "output") or not layers:
            assert node.name not in roles, f"{node.name} is outside every layer"
        else:
            assert roles[node.name][0] == int(layers[0].rpartition(".")[2])


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_projections_split_between_attention_and_ffn(exported, name):
    _, _, gm = exported(name)
    *_, n_attn, n_ffn, _ = LAYOUT[name]
    nodes = {n.name: n for n in gm.graph.nodes}
    for region in find_regions(gm):
        attn = _ops(gm, region.attention, PROJECTIONS)
        ffn = _ops(gm, region.ffn, PROJECTIONS)
        assert len(attn) == n_attn and len(ffn) == n_ffn
        assert all(region.attention_path in _paths(nodes[n]) for n in attn)
        assert all(_paths(nodes[n]) & set(region.ffn_paths) for n in ffn)
        assert _ops(gm, region.other, PROJECTIONS) == []


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_sdpa_is_in_attention(exported, name):
    _, _, gm = exported(name)
    regions = find_regions(gm)
    sdpa = {aten.scaled_dot_product_attention.default}
    assert len(_ops(gm, [n.name for n in gm.graph.nodes], sdpa)) == len(regions)
    for region in regions:
        assert len(_ops(gm, region.attention, sdpa)) == 1


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_norms_follow_the_module_structure(exported, name):
    _, _, gm = exported(name)
    for region in find_regions(gm):
        counts = tuple(len(_ops(gm, getattr(region, role), NORMS)) for role in ("attention", "ffn", "other"))
        assert counts == LAYOUT[name][5]


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_regions_are_disjoint_and_in_graph_order(exported, name):
    _, _, gm = exported(name)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    regions = find_regions(gm)
    names = [n for r in regions for role in (r.attention, r.ffn, r.other) for n in role]
    assert len(names) == len(set(names)) == len(node_roles(regions))
    for region in regions:
        for role in (region.attention, region.ffn, region.other):
            assert [order[n] for n in role] == sorted(order[n] for n in role)


def test_moe_region_holds_router_and_experts(exported):
    _, _, gm = exported("mixtral")
    for region in find_regions(gm):
        ffn = set(region.ffn)
        for target in (aten.topk.default, aten.softmax.int):
            assert len(_ops(gm, ffn, {target})) == 1
        assert len(_ops(gm, ffn, {torch.ops.kiln.moe_experts.default})) == 1


def test_single_layer_model(export):
    model, inputs = zoo.llama(layers=1)
    assert [r.path for r in find_regions(export(model, inputs))] == ["model.layers.0"]


def test_only_computations_with_a_module_stack_are_placed(export):
    model, inputs = zoo.llama(layers=1)
    gm = export(model, inputs)
    before = find_regions(gm)[0]
    nodes = {n.name: n for n in gm.graph.nodes}
    q_proj = nodes[_ops(gm, before.attention, PROJECTIONS)[0]]
    # Graph splitting (torch.fx's split_module) copies a producer's meta onto
    # the placeholders and outputs it creates; those are still not computations.
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            node.meta["nn_module_stack"] = dict(q_proj.meta["nn_module_stack"])
    del q_proj.meta["nn_module_stack"]

    after = find_regions(gm)[0]
    assert after.attention == tuple(n for n in before.attention if n != q_proj.name)
    assert (after.ffn, after.other) == (before.ffn, before.other)


class SelfAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class Block(nn.Module):
    def __init__(self, dim: int, attention: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim) if attention else nn.Identity()
        self.ffn = FeedForward(dim)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.ffn(x)


class Toy(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3, attention: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, attention) for _ in range(depth))
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_hand_written_transformer(export):
    gm = export(Toy().eval(), (torch.randn(2, 5, 16),))
    regions = find_regions(gm)
    assert [(r.path, r.module_type, r.attention_path, r.ffn_paths) for r in regions] == [
        (f"blocks.{i}", "Block", f"blocks.{i}.attn", (f"blocks.{i}.ffn",)) for i in range(3)
    ]
    for region in regions:
        assert len(_ops(gm, region.attention, PROJECTIONS)) == 2
        assert len(_ops(gm, region.ffn, PROJECTIONS)) == 2
        assert len(_ops(gm, region.other, NORMS)) == 1


class LayerSelfAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim)

    def forward(self, x):
        return x + self.attention(self.norm(x))


class LayerFF(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dense = FeedForward(dim)

    def forward(self, x):
        return x + self.dense(self.norm(x))


class NestedBlock(nn.Module):
    """T5's layout: the block's sublayers are themselves integer-indexed (``block.0.layer.1``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layer = nn.ModuleList([LayerSelfAttention(dim), LayerFF(dim)])

    def forward(self, x):
        return self.layer[1](self.layer[0](x))


def test_nested_numbered_sublayers_are_not_layers(export):
    model = nn.Sequential(nn.Linear(16, 16), NestedBlock(16), NestedBlock(16)).eval()
    gm = export(model, (torch.randn(2, 5, 16),))
    regions = find_regions(gm)
    assert [(r.path, r.attention_path, r.ffn_paths) for r in regions] == [
        (f"{i}", f"{i}.layer.0", (f"{i}.layer.1",)) for i in (1, 2)
    ]
    for region in regions:
        assert len(_ops(gm, region.attention, NORMS)) == len(_ops(gm, region.ffn, NORMS)) == 1
        assert region.other == ()


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
    Toy(dim=8, attention=False),  # repeated blocks, but no attention: not transformer layers
], ids=["mlp", "blocks-without-attention"])
def test_models_without_transformer_layers(export, model):
    assert find_regions(export(model.eval(), (torch.randn(3, 8),))) == []
