"""Rewrites keep their metadata: module stack, layer, role, placement and provenance survive the cpu pipeline."""
import logging

import pytest
import torch

from kiln import zoo
from kiln.api import Compilation, CompileOptions
from kiln.ir import NodeMeta, QuantSpec, trace
from kiln.ir.meta import META_KEY
from kiln.ir.regions import find_regions, node_roles
from kiln.ir.rewrite import insert_node, replace_node
from kiln.ir.rows import ROW_RULES
from kiln.passes import Instrument, Pass, PassContext, PassManager, PassResult

aten = torch.ops.aten


def check_layers_annotated(graph, layers: int):
    """Every call node inside a transformer layer of ``graph`` carries that layer and its role.

    "Inside a layer" is region analysis's: the node's module stack runs through
    the layer. That is only a test when no node lost its stack, so that is checked
    first (every node of a traced graph has one, and the passes keep them).
    """
    nodes = graph.compute_nodes()
    lost = [(n.name, graph.meta(n).created_by) for n in nodes if not n.meta.get("nn_module_stack")]
    assert lost == [], f"nodes without a module stack (name, created_by): {lost}"
    regions = find_regions(graph.gm)
    assert len(regions) == layers
    roles = node_roles(regions)
    for n in nodes:
        meta = graph.meta(n)
        if n.name in roles:
            assert (meta.layer, meta.role) == roles[n.name], n.name
        else:
            assert (meta.layer, meta.role) == (None, None), n.name
    # the last layer keeps its attention and FFN, even where prune_rows narrowed them
    assert {r for (layer, r) in roles.values() if layer == layers - 1} >= {"attention", "ffn"}


def final_graph(model, inputs):
    c = Compilation("cpu")
    c.trace(model, inputs)
    c.optimize()
    return c


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_every_zoo_model_keeps_layer_and_role_in_the_final_graph(name):
    model, inputs = zoo.MODELS[name]()
    c = final_graph(model, inputs)
    check_layers_annotated(c.graph, model.config.num_hidden_layers)
    if name == "vit":  # the head reads token 0: the last layer's queries, MLP and norms run on one row
        (rec,) = [r for r in c.records if r.name == "prune_rows"]
        assert rec.stats["ops_narrowed"] > 10
        narrowed = [n for n in c.graph.compute_nodes() if n.name in rec.added and n.target is aten.linear.default]
        assert narrowed and all(c.graph.meta(n).layer == 1 for n in narrowed)
        # a narrowed op is its origin rewritten, not a new node of the pass
        assert {(c.graph.meta(n).created_by, tuple(c.graph.meta(n).rewritten_by)) for n in narrowed} == {
            ("trace", ("prune_rows",))}
        slices = [n for n in c.graph.compute_nodes() if n.target is aten.slice.Tensor and n.name in rec.added]
        assert slices and {c.graph.meta(n).created_by for n in slices} == {"prune_rows"}


class KeepGraph(Instrument):
    """Keeps each graph as the pipeline left it."""

    def __init__(self):
        self.graphs = []

    def after_pipeline(self, graph, ctx, records):
        self.graphs.append(graph)


def test_llm_prefill_graphs_keep_layer_and_role():
    from kiln.llm import compile_llm

    model, _ = zoo.llama()
    keep = KeepGraph()
    compile_llm(model, prefill_buckets=(8,), capacity=16, options=CompileOptions(instruments=[keep]))
    prefill, decode = keep.graphs
    for graph in (prefill, decode):
        check_layers_annotated(graph, model.config.num_hidden_layers)
    # logits of the last position only: prune_rows narrowed the prefill graph's last layer
    sdpa = [n for n in prefill.compute_nodes() if n.target is aten.scaled_dot_product_attention.default]
    assert sdpa[-1].meta["val"].shape[2] == 1 and prefill.meta(sdpa[-1]).layer == 1


def test_rules_are_named_and_logged(caplog):
    assert len({r.name for r in ROW_RULES}) == len(ROW_RULES)
    model, inputs = zoo.vit()
    g = trace(model, inputs)
    with caplog.at_level(logging.DEBUG, logger="kiln"):
        PassManager(["remove_trace_asserts", "eliminate_dead_code", "prune_rows"]).run(g, PassContext())
    fired = {m.split("(rule ")[1].split(")")[0] for m in caplog.messages if "prune_rows:" in m}
    assert {"linear", "layer_norm", "attention_queries", "pointwise", "view", "transpose"} <= fired


def test_insert_and_replace_carry_metadata():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.proj(x))

    g = trace(M(), (torch.randn(2, 4),))
    relu = next(n for n in g.compute_nodes() if n.target is aten.relu.default)
    g.meta(relu).layer, g.meta(relu).role, g.meta(relu).placement = 3, "ffn", "torch"
    g.meta(relu).queue, g.meta(relu).program = "cpu1", "ffn"
    g.meta(relu).quant = QuantSpec("symmetric", (8,), scale="p_proj_scale")

    class RewriteRelu(Pass):
        """relu(y) -> clamp_min(neg(y), 0): one helper node, one replacement."""

        name = "test_rewrite"

        def run(self, graph, ctx):
            neg = insert_node(graph.fx, aten.neg.default, (relu.args[0],), origin=relu)
            replace_node(graph.fx, relu, aten.clamp_min.default, (neg, 0.0))
            return PassResult(True)

    PassManager([RewriteRelu()]).run(g, PassContext())
    neg = next(n for n in g.compute_nodes() if n.target is aten.neg.default)
    new = next(n for n in g.compute_nodes() if n.target is aten.clamp_min.default)
    for n in (neg, new):
        assert n.meta["nn_module_stack"] == relu.meta["nn_module_stack"]
        assert (g.meta(n).layer, g.meta(n).role, g.meta(n).placement) == (3, "ffn", "torch")
        assert (g.meta(n).queue, g.meta(n).program) == ("cpu1", "ffn")
        assert isinstance(n.meta[META_KEY], NodeMeta) and "kiln_replaces" not in n.meta
    assert (g.meta(neg).created_by, g.meta(neg).rewritten_by) == ("test_rewrite", [])
    assert (g.meta(new).created_by, g.meta(new).rewritten_by) == ("trace", ["test_rewrite"])
    assert g.meta(new).types is not None  # the pass manager re-propagated types
    # quant goes to a replacement (the same op computed another way), not to a helper node
    assert g.meta(new).quant == QuantSpec("symmetric", (8,), scale="p_proj_scale") and g.meta(neg).quant is None
