"""kiln.compile / kiln.load on every model of the zoo, and the API's errors."""
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils import _pytree as pytree

import kiln
from kiln import zoo
from kiln.api import Compilation
from kiln.errors import InputMismatchError, KilnError, UnknownNameError
from kiln.passes import get_pipeline

MODELS = ["llama", "qwen2", "gpt2", "mixtral", "bert", "vit", "minilm"]


def eager(model, inputs):
    """The eager reference; causal LMs run without their KV cache, as kiln traces them."""
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", False) else {}
    with torch.no_grad():
        return model(*inputs, **kwargs)


@pytest.fixture(scope="module")
def compiled_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for name in MODELS:
        model, inputs = zoo.MODELS[name]()
        cm = kiln.compile(model, inputs)
        cm.save(root / name)
        ref = eager(model, inputs)
        leaves = pytree.tree_leaves(ref)
        save_file({**{f"in{i}": t for i, t in enumerate(inputs)}, **{f"out{i}": t for i, t in enumerate(leaves)}},
                  str(root / f"{name}.safetensors"))
        out[name] = (model, inputs, cm, ref)
    return root, out


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_matches_eager(compiled_zoo, name):
    _, models = compiled_zoo
    model, inputs, cm, ref = models[name]
    got = cm(*inputs)
    assert type(got) is type(ref)
    got_leaves, got_spec = pytree.tree_flatten(got)
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    assert got_spec == ref_spec
    for g, r in zip(got_leaves, ref_leaves):
        torch.testing.assert_close(g, r)  # fp32 defaults: rtol 1.3e-6, atol 1e-5


def test_every_artifact_runs_in_a_fresh_process(compiled_zoo):
    root, _ = compiled_zoo
    code = textwrap.dedent(f"""
        import sys, torch, kiln
        from pathlib import Path
        from safetensors.torch import load_file
        from torch.utils import _pytree as pytree
        root = Path({str(root)!r})
        for name in {MODELS!r}:
            io = load_file(str(root / f"{{name}}.safetensors"))
            inputs = [io[f"in{{i}}"] for i in range(sum(k.startswith("in") for k in io))]
            expected = [io[f"out{{i}}"] for i in range(sum(k.startswith("out") for k in io))]
            got = pytree.tree_leaves(kiln.load(root / name)(*inputs))
            assert len(got) == len(expected), name
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, msg=lambda m: f"{{name}}: {{m}}")
        assert "kiln.passes" not in sys.modules
        print("ok", len({MODELS!r}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(len(MODELS))]


def test_cleanup_pipeline_removed_work_on_llama(compiled_zoo):
    _, models = compiled_zoo
    passes = {p["name"]: p for p in models["llama"][2].manifest["passes"]}
    assert passes["fold_constants"]["stats"]["folded"] > 0  # rotary tables and the causal mask
    assert passes["remove_trace_asserts"]["stats"]["asserts"] > 0


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale):
        return self.lin(x) * scale


def test_input_mismatch_names_each_input_expected_and_got():
    torch.manual_seed(0)
    cm = kiln.compile(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 1)))
    with pytest.raises(InputMismatchError) as e:
        cm(torch.randn(3, 4), torch.randn(2, 1, dtype=torch.float64))
    msg = str(e.value)
    assert "x: expected f32[2, 4], got f32[3, 4]" in msg
    assert "scale: expected f32[2, 1], got f64[2, 1]" in msg
    with pytest.raises(InputMismatchError) as e:
        cm(torch.randn(2, 4))
    assert "do not have the structure the model was compiled with:\n  expected (T, T)\n  got      (T)" in str(e.value)
    with pytest.raises(InputMismatchError, match="expected \\(T, T\\)\n  got      \\(\\[T\\], T, flag=T\\)"):
        cm([torch.randn(2, 4)], torch.randn(2, 1), flag=True)
    with pytest.raises(InputMismatchError, match="x: expected a tensor f32\\[2, 4\\], got float"):
        cm(1.0, torch.randn(2, 1))


def test_dynamic_shapes_accept_other_sizes_but_keep_static_dims_checked(tmp_path):
    torch.manual_seed(0)
    m = TwoInputs().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    opts = kiln.CompileOptions(dynamic_shapes={"x": {0: batch}, "scale": {0: batch}})
    cm = kiln.compile(m, (torch.randn(2, 4), torch.randn(2, 1)), options=opts)
    cm.save(tmp_path / "dyn")
    loaded = kiln.load(tmp_path / "dyn")
    for n in (1, 7, 33):
        x, s = torch.randn(n, 4), torch.randn(n, 1)
        torch.testing.assert_close(loaded(x, s), m(x, s))
    with pytest.raises(InputMismatchError, match="x: expected f32\\[.*, 4\\], got f32\\[3, 5\\]"):
        loaded(torch.randn(3, 5), torch.randn(3, 1))
    with pytest.raises(InputMismatchError, match="scale"):
        loaded(torch.randn(3, 4), torch.randn(5, 1))  # the same dynamic dim must agree


def test_compile_options_reject_unknown_enum_values_and_wrong_types():
    assert kiln.CompileOptions(verify="always").verify.value == "always"
    with pytest.raises(UnknownNameError, match="'sometimes'.*always, auto, never"):
        kiln.CompileOptions(verify="sometimes")
    with pytest.raises(KilnError, match="options must be a kiln.CompileOptions, not dict"):
        kiln.compile(nn.ReLU(), (torch.randn(2),), options={"verify": "always"})


def test_explicit_pass_list_and_unknown_names():
    m, x = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval(), torch.randn(2, 3)
    cm = kiln.compile(m, (x,), passes=["eliminate_dead_code"])
    assert [p["name"] for p in cm.manifest["passes"]] == ["eliminate_dead_code"]
    torch.testing.assert_close(cm(x), m(x))
    with pytest.raises(UnknownNameError, match="unknown pass 'fuse_everything'"):
        kiln.compile(m, (x,), passes=["fuse_everything"])
    with pytest.raises(UnknownNameError, match="unknown pipeline 'fast'"):
        kiln.compile(m, (x,), options=kiln.CompileOptions(pipeline="fast"))


def test_compilation_checks_names_up_front_and_runs_stages_in_order():
    with pytest.raises(UnknownNameError, match="unknown target"):
        Compilation("tpu")
    with pytest.raises(UnknownNameError, match="unknown pass 'nope'"):
        Compilation("cpu", passes=["nope"])
    c = Compilation("cpu")
    with pytest.raises(KilnError, match="optimize\\(\\) needs trace\\(\\) first"):
        c.optimize()
    m, x = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).eval(), torch.randn(2, 3)
    graph = c.trace(m, (x,))
    assert graph.meta(graph.compute_nodes()[0]).placement is None
    assert [r.name for r in c.optimize()] == get_pipeline("cpu")
    assert {graph.meta(n).placement for n in graph.compute_nodes()} == {"cpu"}  # the pipeline's last pass
    cm = c.lower()
    assert {graph.meta(n).placement for n in graph.compute_nodes()} == {"cpu"}
    torch.testing.assert_close(cm(x), m(x))
