"""MoE models as handed over: HF experts traced as ``kiln::moe_experts``, compiled, saved and reloaded."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import kiln
from kiln import zoo
from kiln.backends.pytorch import TorchBackend
from kiln.errors import ArtifactError
from kiln.ir import trace
from kiln.ir.ops import moe_experts_reference
from kiln.ir.serialize import graph_from_json, graph_to_json, op_refusal, resolve_target

MOE = torch.ops.kiln.moe_experts.default
MOE_MODELS = {"mixtral": zoo.mixtral, "qwen2_moe": zoo.qwen2_moe}
_ROGUE_LIB = torch.library.Library("kiln", "FRAGMENT")  # a kiln:: op that kiln does not register


def _routing(tokens=12, hidden=16, inter=8, experts=4, k=2, transposed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    # Expert 3 gets no token: the op must skip an empty group.
    idx = torch.stack([torch.randperm(experts - 1, generator=gen)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=gen)
    up_shape, down_shape = ((experts, hidden, 2 * inter), (experts, inter, hidden)) if transposed else \
        ((experts, 2 * inter, hidden), (experts, hidden, inter))
    return x, idx, w, torch.randn(*up_shape, generator=gen), torch.randn(*down_shape, generator=gen)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("transposed", [False, True])
def test_moe_experts_matches_a_per_token_loop(activation, transposed):
    args = _routing(transposed=transposed)
    got = MOE(*args, activation, transposed)
    torch.testing.assert_close(got, moe_experts_reference(*args, activation, transposed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_is_transformers_default_experts_forward(dtype):
    # Same op order as transformers' grouped_mm path (fp32 routing weights on bf16 experts included).
    model, _ = zoo.mixtral(layers=1)
    experts = model.to(dtype).model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, model.config.hidden_size, generator=gen).to(dtype)
    weights, index = torch.topk(torch.randn(16, 4, generator=gen).softmax(-1), 2)
    weights = weights / weights.sum(-1, keepdim=True)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        got = MOE(hidden, index, weights, experts.gate_up_proj, experts.down_proj, "silu", False)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected)


def test_moe_experts_fake_kernel_and_index_checks():
    args = _routing()
    with torch._subclasses.FakeTensorMode() as mode:
        fake = MOE(*(mode.from_tensor(a) for a in args), "silu", False)
    assert fake.shape == args[0].shape and fake.dtype == args[0].dtype
    x, idx, w, up, down = args
    with pytest.raises(IndexError, match="expert index out of range"):
        MOE(x, idx + 2, w, up, down, "silu", False)
    with pytest.raises(RuntimeError, match="unknown activation"):
        MOE(x, idx, w, up, down, "tanh", False)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_every_experts_implementation_traces_to_one_op_per_layer(implementation):
    # grouped_mm (the default) alone would trace to transformers::grouped_mm_fallback, eager not at all.
    model, inputs = zoo.mixtral(experts_implementation=implementation)
    graph = trace(model, inputs)
    moe = [n for n in graph.nodes if n.op == "call_function" and n.target == MOE]
    assert len(moe) == model.config.num_hidden_layers
    assert not [n for n in graph.nodes if "transformers" in str(n.target)]
    assert [a.name for a in moe[0].args[3:5]] == ["p_model_layers_0_mlp_experts_gate_up_proj",
                                                  "p_model_layers_0_mlp_experts_down_proj"]
    assert "experts" in next(reversed(moe[0].meta["nn_module_stack"].values()))[0]
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__
    # The module's forward is its own again after the trace, and the compiled op computes what it does.
    torch.testing.assert_close(kiln.compile(model, inputs, target="torch")(*inputs).logits, _eager(model, inputs))


def test_graph_with_moe_passes_verifier_and_json_round_trip():
    model, inputs = zoo.mixtral(layers=1)
    graph = trace(model, inputs)
    graph.verify()
    data = graph_to_json(graph.gm)
    assert "kiln.moe_experts.default" in {e.get("target") for e in data["nodes"]}
    gm = graph_from_json(data)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == \
        [n.target for n in graph.nodes if n.op == "call_function"]
    with torch.no_grad():
        expected = graph.run(list(inputs))
        got = gm(*graph.placeholder_args(list(inputs)))
    torch.testing.assert_close(got, expected)


def test_only_kiln_registered_ops_of_the_kiln_namespace_are_admitted():
    assert op_refusal(MOE) is None and resolve_target("kiln.moe_experts.default") is MOE
    if not hasattr(torch.ops.kiln, "rogue_for_test"):  # defined once a process
        _ROGUE_LIB.define("rogue_for_test(Tensor x) -> Tensor")
    rogue = torch.ops.kiln.rogue_for_test.default
    assert "does not register" in op_refusal(rogue)
    with pytest.raises(ArtifactError, match="not allowed"):
        resolve_target("kiln.rogue_for_test.default")
    with pytest.raises(ArtifactError, match="does not exist"):
        resolve_target("kiln.no_such_op.default")

    class Node:  # what supports() reads
        target = rogue
    assert not TorchBackend().supports(Node())
    Node.target = MOE
    assert TorchBackend().supports(Node())


def _eager(model, inputs):
    with torch.no_grad():
        return model(*inputs, use_cache=False).logits


@pytest.fixture(scope="module")
def compiled_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, factory in MOE_MODELS.items():
        model, inputs = factory()
        assert model.config._experts_implementation == "grouped_mm"  # transformers' default, as handed over
        ref = _eager(model, inputs)
        save_file({"ids": inputs[0], "logits": ref}, str(root / f"{name}.safetensors"))
        for target in ("cpu", "torch"):
            cm = kiln.compile(model, inputs, target=target)
            cm.save(root / f"{name}-{target}")
            out[name, target] = (cm, inputs, ref)
    return root, out


@pytest.mark.parametrize("target", ["cpu", "torch"])
@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_moe_model_compiles_as_handed_over_and_matches_eager(compiled_moe, name, target):
    _, models = compiled_moe
    cm, inputs, ref = models[name, target]
    torch.testing.assert_close(cm(*inputs).logits, ref)  # fp32 defaults
    assert '"kiln.moe_experts.default"' in json.dumps(cm.manifest)  # run as the op, not as its decomposition


def test_moe_artifacts_run_in_a_fresh_process(compiled_moe):
    root, _ = compiled_moe
    code = textwrap.dedent(f"""
        import sys, torch, kiln
        from pathlib import Path
        from safetensors.torch import load_file
        from torch.utils import _pytree as pytree
        root = Path({str(root)!r})
        for name in {list(MOE_MODELS)!r}:
            io = load_file(str(root / f"{{name}}.safetensors"))
            for target in ("cpu", "torch"):
                got, = pytree.tree_leaves(kiln.load(root / f"{{name}}-{{target}}")(io["ids"]))
                torch.testing.assert_close(got, io["logits"], msg=lambda m: f"{{name}} {{target}}: {{m}}")
        assert "kiln.passes" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok"]


def test_unrecognised_experts_modules_run_as_kiln_grouped_mm(monkeypatch):
    # An experts module kiln::moe_experts does not describe keeps transformers' own computation;
    # its grouped_mm_fallback op becomes kiln::grouped_mm, which runs without transformers.
    import kiln.ir.moe

    monkeypatch.setattr(kiln.ir.moe, "experts_activation", lambda module: None)
    model, inputs = zoo.mixtral(layers=1)
    graph = trace(model, inputs)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.kiln.grouped_mm.default) == 2 and MOE not in targets
    assert not [t for t in targets if "transformers" in str(t)]
    cm = kiln.compile(model, inputs, target="cpu")
    torch.testing.assert_close(cm(*inputs).logits, _eager(model, inputs))


def test_kiln_grouped_mm_is_transformers_fallback():
    from transformers.integrations import moe  # noqa: F401 - registers transformers::grouped_mm_fallback

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 8, generator=gen), torch.randn(3, 8, 5, generator=gen)
    for offs in ([4, 4, 9], [0, 10, 10]):
        offs = torch.tensor(offs, dtype=torch.int32)
        torch.testing.assert_close(torch.ops.kiln.grouped_mm(x, w, offs),
                                   torch.ops.transformers.grouped_mm_fallback(x, w, offs), rtol=0, atol=0)
    with pytest.raises(IndexError):
        torch.ops.kiln.grouped_mm(x, w, torch.tensor([5, 3, 9]))


def test_moe_llm_greedy_tokens_equal_hf():
    from kiln.llm import compile_llm

    model, (ids,) = zoo.mixtral(seq=11)
    llm = compile_llm(model, prefill_buckets=(16,), capacity=32)
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(llm.generate(ids, max_new_tokens=4), expected)
