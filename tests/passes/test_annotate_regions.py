import torch

from kiln import zoo
from kiln.ir import trace
from kiln.passes import PassContext, PassManager, get_pipeline


def test_llama_nodes_carry_layer_and_role_after_the_default_pipeline():
    model, inputs = zoo.llama()
    g = trace(model, inputs)
    records = PassManager(get_pipeline("cpu")).run(g, PassContext())
    rec = next(r for r in records if r.name == "annotate_regions")
    assert rec.added == rec.removed == rec.rewritten == []
    assert len(rec.annotated) == rec.stats["attention"] + rec.stats["ffn"] + rec.stats["other"]
    assert rec.stats["layers"] == model.config.num_hidden_layers
    by_role = {}
    for n in g.compute_nodes():
        meta = g.meta(n)
        if n.target == torch.ops.aten.linear.default and meta.layer is not None:
            module = list(n.meta["nn_module_stack"].values())[-1][0]
            by_role[module] = (meta.layer, meta.role)
    assert by_role["model.layers.1.self_attn.q_proj"] == (1, "attention")
    assert by_role["model.layers.0.mlp.down_proj"] == (0, "ffn")
    sdpa = [n for n in g.compute_nodes() if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert [g.meta(n).role for n in sdpa] == ["attention", "attention"]
    assert "{placement=cpu, layer=0, role=attention}" in g.text()  # placed by the pipeline's last pass
    lm_head = [n for n in g.compute_nodes() if g.meta(n).layer is None and n.target == torch.ops.aten.linear.default]
    assert len(lm_head) == 1
    # idempotent: a second run changes nothing
    assert PassManager(["annotate_regions"]).run(g, PassContext())[0].modified is False
