"""The extract_outliers pass: int8 linears with the calibrated activation outlier channels computed in float.

Exactness at both ends (no outlier: bitwise plain int8; every channel an
outlier: the float linear within fp32 tolerance), a hand-computed selection,
the calibrated defaults (the derived threshold, the per-layer cap, the float
paths dropped where they gain little), the compiled model against the
op-by-op reference and against eager fp32, bad options, save and load.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import kiln
from kiln import CompileOptions, Int8Quantization, NestedQuantization, zoo
from kiln.api import Compilation
from kiln.cli import main
from kiln.errors import KilnError, PassError
from kiln.ir.ops import int8_linear
from kiln.passes.extract_outliers import choose_outliers, quantize_weight

INT8 = torch.ops.kiln.int8_linear.default
LINEAR = torch.ops.aten.linear.default
INDEX_SELECT = torch.ops.aten.index_select.default

# The channel abs-maxes of the hand-computed case: sorted, 0.5 1 1 1 1.5 2 30 40; the lower median is 1.
ABSMAX = torch.tensor([1.0, 2.0, 1.0, 40.0, 1.0, 0.5, 30.0, 1.5])


def _stats(compiled) -> dict:
    return next(p["stats"] for p in compiled.manifest["programs"]["main"]["passes"] if p["name"] == "extract_outliers")


def _linear(k=8, n=3, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).eval()


def _calibration_with_absmax(absmax: torch.Tensor, rows: int = 6, seed: int = 1) -> list[tuple[torch.Tensor]]:
    """Samples whose per-channel abs-max is exactly ``absmax`` (each channel reaches it once, with either sign)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(rows, absmax.numel(), generator=g) * 2 - 1) * absmax * 0.9
    x[0] = absmax * torch.where(torch.arange(absmax.numel()) % 2 == 0, 1.0, -1.0)
    return [(x[:3],), (x[3:],)]


def _compile(model, inputs, int8, calibration=None, target="cpu"):
    return kiln.compile(model, inputs, target=target, options=CompileOptions(calibration=calibration, int8=int8))


def _pass_stats(compilation) -> dict:
    return next(r.stats for r in compilation.records if r.name == "extract_outliers")


def _final_graph(model, inputs, int8, calibration=None, target="cpu"):
    c = Compilation(target, options=CompileOptions(calibration=calibration, int8=int8))
    c.trace(model, inputs)
    c.optimize()
    return c


def test_without_the_option_nothing_changes():
    m = _linear()
    c = _final_graph(m, (torch.randn(3, 8),), None)
    assert [n.target for n in c.graph.compute_nodes()] == [LINEAR]


def test_an_infinite_threshold_is_bitwise_plain_int8():
    m = _linear(k=16, n=5)
    calibration = [(torch.randn(7, 16) * 3,) for _ in range(3)]
    x = torch.randn(7, 16) * 2
    compiled = _compile(m, (x,), Int8Quantization(threshold=math.inf), calibration)
    # plain int8 by hand: per-tensor scale from every channel, per-output-channel symmetric weights
    absmax = max(s[0].abs().max().item() for s in calibration)
    x_scale = torch.tensor(absmax / 127, dtype=torch.float32).item()
    w = m.weight.detach()
    ws = (w.abs().amax(1) / 127).float()
    wq = torch.clamp(torch.round(w / ws[:, None]), -127, 127).to(torch.int8)
    want = int8_linear(x, wq, ws, m.bias.detach(), x_scale)
    assert torch.equal(compiled(x), want)
    stats = _stats(compiled)
    assert stats["float_channels"] == 0 and stats["float_path"] == 0
    assert next(iter(stats["layers"].values()))["x_scale"] == x_scale


def test_a_zero_threshold_sends_every_channel_to_float_and_equals_the_float_linear():
    m = _linear(k=32, n=6)
    calibration = [(torch.randn(5, 32),) for _ in range(2)]
    x = torch.randn(5, 32)
    int8 = Int8Quantization(threshold=0.0, max_fraction=1.0, float_path="all")
    c = _final_graph(m, (x,), int8, calibration)
    layer = next(iter(_pass_stats(c)["layers"].values()))
    assert layer["float_channels"] == list(range(32))
    compiled = c.lower()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x))  # fp32 tolerance (rtol 1.3e-6, atol 1e-5)
        torch.testing.assert_close(c.graph(x), m(x))


def test_a_hand_computed_case_picks_the_channels_scale_and_weight_columns():
    m = _linear(k=8, n=3)
    calibration = _calibration_with_absmax(ABSMAX)
    # threshold 6 x lower median 1 = 6: channels 3 (40) and 6 (30); a cap of 2 of 8 channels keeps both
    c = _final_graph(m, (torch.randn(3, 8),), Int8Quantization(max_fraction=0.25, float_path="all"), calibration)
    layer = next(iter(_pass_stats(c)["layers"].values()))
    assert layer["threshold"] == 6.0 and layer["float_channels"] == [3, 6]
    assert layer["x_scale"] == torch.tensor(2.0 / 127, dtype=torch.float32).item()  # the largest other channel: 2
    nodes = {n.target: n for n in c.graph.compute_nodes()}
    assert set(nodes) == {INT8, INDEX_SELECT, LINEAR, torch.ops.aten.add.Tensor}
    q, shadow = nodes[INT8], nodes[LINEAR]
    weights = c.graph.weights
    wq, ws, idx, wf = (weights[a.name] for a in (q.args[1], q.args[2], nodes[INDEX_SELECT].args[2], shadow.args[1]))
    w = m.weight.detach()
    assert idx.tolist() == [3, 6] and idx.dtype == torch.int64
    assert torch.equal(wf, w[:, [3, 6]])  # the outlier columns of the float weight, as they are
    assert wq.dtype == torch.int8 and torch.equal(wq[:, [3, 6]], torch.zeros(3, 2, dtype=torch.int8))
    others = [0, 1, 2, 4, 5, 7]
    want_ws = (w[:, others].abs().amax(1) / 127).float()
    assert torch.equal(ws, want_ws)
    assert torch.equal(wq[:, others], torch.round(w[:, others] / want_ws[:, None]).to(torch.int8))
    assert q.args[4] == layer["x_scale"]
    spec = c.graph.meta(q).quant
    assert (spec.scheme, spec.bits, spec.axis, spec.layout, spec.scale) == ("symmetric", (8,), 0, "per-channel",
                                                                             q.args[2].name)
    # the op-by-op graph is exactly int8 on the clipped channels plus float on the outliers
    x = torch.randn(3, 8) * ABSMAX
    want = int8_linear(x, wq, ws, m.bias.detach(), layer["x_scale"]) + F.linear(x[:, [3, 6]], w[:, [3, 6]])
    assert torch.equal(c.graph(x), want)
    compiled = c.lower()
    torch.testing.assert_close(compiled(x), want)  # the float part may run another fp32 kernel
    # a cap of 1 of 8 channels keeps the largest (3); channel 6 then sets the scale
    c1 = _final_graph(m, (torch.randn(3, 8),), Int8Quantization(max_fraction=0.125, float_path="all"), calibration)
    layer1 = next(iter(_pass_stats(c1)["layers"].values()))
    assert layer1["float_channels"] == [3] and layer1["x_scale"] == torch.tensor(30 / 127, dtype=torch.float32).item()


def test_choose_outliers_breaks_ties_by_channel_and_never_takes_a_channel_at_the_threshold():
    a = torch.tensor([5.0, 9.0, 9.0, 6.0, 1.0])
    assert choose_outliers(a, 6.0, 1.0).idx == [1, 2]  # 6.0 is not above 6.0
    assert choose_outliers(a, 6.0, 0.2).idx == [1]  # one of five: the lower index of the tie
    assert choose_outliers(a, math.inf, 1.0).idx == [] and choose_outliers(a, 0.0, 0.0).idx == []
    everything = choose_outliers(a, 0.0, 1.0)
    assert everything.idx == [0, 1, 2, 3, 4] and everything.x_scale == 1.0  # no int8 channel left: any scale
    codes, scale = quantize_weight(torch.ones(2, 5), [0, 1, 2, 3, 4])
    assert torch.equal(codes, torch.zeros(2, 5, dtype=torch.int8)) and torch.equal(scale, torch.ones(2))


class TwoLinears(nn.Module):
    """``big`` sees one channel 25x the others; ``mild`` one channel 1.1x the others."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.big, self.mild = nn.Linear(64, 16), nn.Linear(64, 16)

    def forward(self, a, b):
        return self.big(a), self.mild(b)


def _two_linears_data(seed=2):
    g = torch.Generator().manual_seed(seed)
    scale_a = torch.ones(64)
    scale_a[5] = 25.0
    scale_b = torch.ones(64)
    scale_b[9] = 1.1

    def sample():
        return ((torch.rand(32, 64, generator=g) * 2 - 1) * scale_a, (torch.rand(32, 64, generator=g) * 2 - 1) * scale_b)
    return [sample() for _ in range(4)], sample()


def test_auto_keeps_the_float_path_where_it_cuts_the_error_and_drops_it_where_it_does_not():
    m = TwoLinears().eval()
    calibration, inputs = _two_linears_data()
    compiled = _compile(m, inputs, Int8Quantization(threshold=1.05, max_fraction=0.05), calibration)
    layers = _stats(compiled)["layers"]
    big, mild = layers["big"], layers["mild"]
    assert big["float_channels"] == [5] and big["float_path"].startswith("kept (gain")
    assert big["rel_error_plain"] > 10 * big["rel_error_outliers"]
    assert mild["candidates"] == 1 and mild["float_channels"] == [] and mild["float_path"].startswith("dropped (gain")
    assert mild["rel_error_plain"] < 1.5 * mild["rel_error_outliers"]
    # a dropped layer is plain w8a8 over every channel: its scale covers the mild outlier too
    assert mild["x_scale"] == pytest.approx(1.1 / 127, rel=1e-2)
    # named: only "mild" keeps one; "none": neither; exclude leaves "big" an aten.linear
    named = _stats(_compile(m, inputs, Int8Quantization(threshold=1.05, max_fraction=0.05, float_path=("mild",)),
                            calibration))["layers"]
    assert named["big"]["float_channels"] == [] and named["mild"]["float_channels"] == [9]
    assert named["big"]["float_path"] == "dropped (not named)"
    assert _stats(_compile(m, inputs, Int8Quantization(threshold=1.05, float_path="none", max_fraction=0.05),
                           calibration))["float_channels"] == 0
    c = _final_graph(m, inputs, Int8Quantization(exclude=("big",)), calibration)
    assert [n.target for n in c.graph.compute_nodes()].count(LINEAR) == 1
    assert list(_pass_stats(c)["layers"]) == ["mild"]


def test_the_derived_threshold_follows_each_layer_s_median_and_the_cap_bounds_every_layer():
    m = TwoLinears().eval()
    calibration, inputs = _two_linears_data()
    # defaults: 6 x the median (about 1): channel 5 of big (25) is an outlier, channel 9 of mild (1.1) is not
    stats = _stats(_compile(m, inputs, Int8Quantization(max_fraction=0.05, float_path="all"), calibration))
    assert stats["layers"]["big"]["float_channels"] == [5] and stats["layers"]["mild"]["candidates"] == 0
    assert stats["layers"]["big"]["threshold"] == pytest.approx(6.0, rel=0.05)
    assert stats["float_channels"] == 1 and stats["channels"] == 128 and stats["float_fraction"] == 1 / 128
    # the default cap, 1% of 64 channels, is 0 channels: no float path at all
    assert _stats(_compile(m, inputs, Int8Quantization(float_path="all"), calibration))["float_channels"] == 0


def _bert_with_outliers():
    """The zoo's random BERT with two residual-stream channels scaled up 20x by its LayerNorms (as trained BERTs
    carry a few outlier dimensions): the q/k/v and FFN inputs then hold real outlier channels."""
    model, inputs = zoo.bert()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight[[7, 40]] *= 20
    g = torch.Generator().manual_seed(3)
    ids, mask = inputs
    calibration = [(torch.randint(0, model.config.vocab_size, ids.shape, generator=g), mask) for _ in range(4)]
    return model, inputs, calibration


def test_the_compiled_model_matches_the_op_by_op_reference_and_eager_within_its_bound():
    model, inputs, calibration = _bert_with_outliers()
    int8 = Int8Quantization(max_fraction=0.05)
    c = _final_graph(model, inputs, int8, calibration)
    stats = _pass_stats(c)
    assert stats["float_path"] > 0 and all(7 in e["float_channels"] and 40 in e["float_channels"]
                                           for e in stats["layers"].values() if e["float_channels"])
    # k and v read q's input: they reuse its gather of the outlier channels (one index_select per input)
    gathers = sum(n.target is INDEX_SELECT for n in c.graph.compute_nodes())
    assert gathers == stats["float_path"] - 2 * model.config.num_hidden_layers
    reference = c.graph.run(c.flat_inputs)  # op by op, PyTorch kernels
    compiled = c.lower()
    got = compiled.run(c.flat_inputs)
    for g, r in zip(got, reference):
        # the float ops may round differently on the cpu backend, which can move an int8 code by one step
        assert (g - r).abs().max().item() < 1e-3
        assert ((g - r).norm() / r.norm()).item() < 1e-5
    with torch.no_grad():
        eager = model(*inputs)
        plain = _compile(model, inputs, Int8Quantization(float_path="none"), calibration).run(c.flat_inputs)
    # the stated bound, against eager fp32: relative error under 1% in both outputs (the hidden states, the
    # pooled output), every row's cosine above 0.999; and the pooled output (the tanh of a linear over the first
    # token, where the 20x channels weigh most) 10x closer than plain w8a8, whose per-tensor scales span them
    for out, want in zip(got, (eager.last_hidden_state, eager.pooler_output)):
        assert ((out - want).norm() / want.norm()).item() < 0.01
        assert F.cosine_similarity(out, want, dim=-1).min() > 0.999
    pooled_error = ((got[1] - eager.pooler_output).norm() / eager.pooler_output.norm()).item()
    pooled_plain = ((plain[1] - eager.pooler_output).norm() / eager.pooler_output.norm()).item()
    assert pooled_error < pooled_plain / 10


@pytest.mark.slow
def test_the_trained_minilm_compiled_matches_its_op_by_op_reference_and_stays_near_eager():
    model, inputs = zoo.minilm()
    g = torch.Generator().manual_seed(5)
    calibration = [(torch.randint(1000, 20000, inputs[0].shape, generator=g), inputs[1]) for _ in range(4)]
    c = _final_graph(model, inputs, Int8Quantization(), calibration)
    stats = _pass_stats(c)
    assert 0 < stats["float_fraction"] <= 0.01
    reference = c.graph.run(c.flat_inputs)
    got = c.lower().run(c.flat_inputs)
    for g_, r in zip(got, reference):
        assert (g_ - r).abs().max().item() < 1e-3 and ((g_ - r).norm() / r.norm()).item() < 1e-5
    with torch.no_grad():
        want = model(*inputs).last_hidden_state
    assert ((got[0] - want).norm() / want.norm()).item() < 0.15
    assert F.cosine_similarity(got[0], want, dim=-1).min() > 0.98


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": -1.0}, r"Int8Quantization.threshold must be a number >= 0 .* not -1.0"),
    ({"threshold": float("nan")}, r"Int8Quantization.threshold must be a number"),
    ({"threshold": "6"}, r"Int8Quantization.threshold must be a number"),
    ({"ratio": 0}, r"Int8Quantization.ratio must be a number > 0"),
    ({"max_fraction": 1.5}, r"Int8Quantization.max_fraction must be a fraction in \[0, 1\], not 1.5"),
    ({"min_gain": 0.5}, r"Int8Quantization.min_gain must be a finite number >= 1"),
    ({"float_path": "sometimes"}, r"Int8Quantization.float_path must be one of 'auto', 'all', 'none' or a tuple"),
    ({"float_path": ("a", 3)}, r"Int8Quantization.float_path must be a tuple of layer names"),
    ({"exclude": "big"}, r"Int8Quantization.exclude must be a tuple of layer names"),
])
def test_bad_options_name_the_field(kwargs, message):
    with pytest.raises(KilnError, match=message):
        Int8Quantization(**kwargs)


def test_bad_compile_options_and_unknown_layer_names_are_refused():
    with pytest.raises(KilnError, match="CompileOptions.int8 must be a kiln.Int8Quantization, not dict"):
        CompileOptions(int8={"threshold": 6})
    with pytest.raises(KilnError, match="CompileOptions.int8 and CompileOptions.quantization both quantize"):
        CompileOptions(int8=Int8Quantization(), quantization=NestedQuantization())
    options = Int8Quantization()
    with pytest.raises(AttributeError):
        options.ratio = 2.0  # frozen
    m = TwoLinears().eval()
    calibration, inputs = _two_linears_data()
    with pytest.raises(PassError, match=r"extract_outliers.*Int8Quantization.float_path names layers \['bigg'\] .*"
                                        r"the linears: big, mild"):
        _compile(m, inputs, Int8Quantization(float_path=("bigg",)), calibration, target="torch")
    with pytest.raises(PassError, match=r"Int8Quantization.exclude names layers \['x'\]"):
        _compile(m, inputs, Int8Quantization(exclude=("x",)), calibration, target="torch")
    with pytest.raises(PassError, match="extract_outliers: the model has no linear layer it can quantize"):
        _compile(m, inputs, Int8Quantization(exclude=("big", "mild")), calibration, target="torch")


@pytest.mark.parametrize("target", ["cpu", "npu"])
def test_int8_and_outlier_weights_survive_save_and_load_in_a_fresh_process(tmp_path, fresh_python, target):
    m = TwoLinears().eval()
    calibration, inputs = _two_linears_data()
    compiled = _compile(m, inputs, Int8Quantization(threshold=1.05, max_fraction=0.05, float_path="all"), calibration,
                        target=target)
    backends = {p["backend"] for p in compiled.manifest["partitions"]}
    assert backends == ({"npu", "cpu"} if target == "npu" else {"torch", "cpu"})  # int8 on npu (or torch), float on cpu
    path = compiled.save(tmp_path / "a")
    with safe_open(str(path / "weights.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {k: v for k, v in dtypes.items() if k.endswith("_int8")} == {"p_big_weight_int8": "I8",
                                                                          "p_mild_weight_int8": "I8"}
    assert dtypes["p_big_weight_outlier"] == "F32" and dtypes["p_big_weight_outlier_idx"] == "I64"
    assert "p_big_weight" not in dtypes  # the float weight itself is gone: only its outlier columns are kept
    loaded = kiln.load(path)
    for a, b in zip(loaded(*inputs), compiled(*inputs)):
        assert torch.equal(a, b)
    save_file({"a": inputs[0], "b": inputs[1], **{f"out{i}": t for i, t in enumerate(compiled(*inputs))}},
              tmp_path / "ref.safetensors")
    out = fresh_python(f"""
        import torch, kiln
        from safetensors.torch import load_file
        ref = load_file({str(tmp_path / 'ref.safetensors')!r})
        m = kiln.load({str(path)!r})
        got = m(ref["a"], ref["b"])
        assert all(torch.equal(g, ref[f"out{{i}}"]) for i, g in enumerate(got))
        print("ok")
    """)
    assert out.split() == ["ok"]


CLI_FACTORY = """
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.rand(16, 64) * 2 - 1
    x[:, 5] *= 30
    return model, (x,)
"""


def _cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_kiln_inspect_int8_shows_each_layer_s_float_channels_scale_and_the_totals(tmp_path):
    factory = tmp_path / "models.py"
    factory.write_text(CLI_FACTORY)
    code, out, err = _cli("inspect", f"{factory}:mlp", "--target", "torch", "--int8", "max_fraction=0.05")
    assert code == 0, err
    assert "int8 linears (extract_outliers): activation outlier channels on the float path" in out
    row = next(line for line in out.splitlines() if line.startswith("│ 0 "))
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[0] == "0" and cells[2] == "64" and cells[5] == "1: [5]" and cells[7].startswith("kept (gain")
    assert "1 of 96 input channels on the float path (1.04%), in 1 of 2 int8 linears" in out
    assert "int8=2 float_path=1 float_channels=1" in out  # the pass table's stats, without the per-layer report
    code, _, err = _cli("inspect", f"{factory}:mlp", "--target", "torch", "--int8", "max_fraction=2")
    assert code == 1 and "Int8Quantization.max_fraction must be a fraction in [0, 1], not 2.0" in err


@pytest.mark.parametrize("value", ["bogus=1", "ratio", "ratio=six"])
def test_bad_int8_flags_are_usage_errors(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "m.py:f", "--int8", value])
    assert e.value.code == 2 and "--int8" in capsys.readouterr().err
