"""The quantize_nested pass: groups, sensitivity, allocation, one program per plan, the plan as a control."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import kiln
from kiln import CompileOptions, NestedQuantization, zoo
from kiln.errors import KilnError
from kiln.ir import nested
from kiln.passes.quantize_nested import allocate
from kiln.runtime import ControlError

NESTED = torch.ops.kiln.nested_linear.default


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(128, 256), nn.Linear(256, 128), nn.Linear(128, 10)
        self.odd = nn.Linear(10, 3)  # 10 inputs: not a multiple of 128, stays float

    def forward(self, x):
        return self.odd(self.head(torch.relu(self.down(torch.relu(self.up(x))))))


def _mlp():
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(4, 128)


def _with_views(model: nn.Module, bits_of: dict[str, int]) -> nn.Module:
    """The float model with each named linear's weight replaced by its nested view (the reference of a plan)."""
    import copy
    ref = copy.deepcopy(model)
    for name, bits in bits_of.items():
        lin = ref.get_submodule(name)
        lin.weight.data = nested.encode(lin.weight.data).dequantize(bits)
    return ref


def test_allocation_matches_a_hand_computed_case():
    sizes = {"a": 100, "b": 100, "c": 200}
    profile = {"a": {2: 10.0, 4: 2.0, 8: 1.0},
               "b": {2: 3.0, 4: 2.9, 8: 2.8},
               "c": {2: 9.0, 4: 1.0, 8: 0.9}}
    # 3 bits x 400 weights = 1200. What fits: {a4 b4 c2} (1200, error 13.9), {a2 b2 c4} (1200, 14.0),
    # {a4 b2 c2} (1000, 14.0), ...; a at 8 or c at 4 with a at 4 costs 1400.
    assert allocate(sizes, profile, 3.0, (8, 4, 2)) == {"a": 4, "b": 4, "c": 2}
    assert allocate(sizes, profile, 2.0, (8, 4, 2)) == {"a": 2, "b": 2, "c": 2}
    assert allocate(sizes, profile, 8.0, (8, 4, 2)) == {"a": 8, "b": 8, "c": 8}
    # 5 bits (2000): {a: 8, b: 4, c: 4} costs 800 + 400 + 800 with error 1 + 2.9 + 1 = 4.9, the least that fits.
    assert allocate(sizes, profile, 5.0, (8, 4, 2)) == {"a": 8, "b": 4, "c": 4}


def test_allocation_uses_the_budget_where_widening_the_best_ratio_first_would_not():
    sizes = {"small": 10, "big": 1000}
    profile = {"small": {2: 1.0, 4: 0.5, 8: 0.0},  # 0.5 removed per 20 bits: the best ratio (0.025 per bit)
               "big": {2: 50.0, 4: 10.0, 8: 0.0}}  # 40 removed per 2000 bits (0.02 per bit)
    # 3.99 bits x 1010 weights = 4029.9. Best-ratio-first widens small to 4 (40 + 2000), then big to 4 no
    # longer fits (4040), so it ends at small 8, big 2: error 50. Big at 4 with small at 2 costs 4020: error 11.
    assert allocate(sizes, profile, 3.99, (8, 4, 2)) == {"small": 2, "big": 4}
    assert allocate(sizes, profile, 6.0, (8, 4, 2)) == {"small": 8, "big": 4}


def test_each_plan_is_a_program_over_one_weight_store_selected_by_the_plan_control(tmp_path):
    m, x = _mlp()
    q = NestedQuantization(plans={"w8": {"default": 8}, "mixed": {"default": 2, "up": 8}, "w2": {"default": 2}})
    cm = kiln.compile(m, (x,), target="torch", options=CompileOptions(quantization=q))
    assert list(cm.programs) == ["w8", "mixed", "w2"]
    assert cm.controls["plan"].allowed == ("w8", "mixed", "w2") and cm.controls["plan"].value == "w8"
    report = cm.manifest["quantization"]
    assert report["plans"]["mixed"]["bits"] == {"up": 8, "down": 2, "head": 2}
    assert report["left_float"] == ["linear_3 (10 inputs: not a multiple of 128)"]
    for plan, bits in {"w8": {"up": 8, "down": 8, "head": 8}, "mixed": {"up": 8, "down": 2, "head": 2},
                       "w2": {"up": 2, "down": 2, "head": 2}}.items():
        with cm.using(plan=plan):
            torch.testing.assert_close(cm(x), _with_views(m, bits)(x), rtol=1e-5, atol=1e-5)
    # every tensor stored once: the planes of "up" are shared by all three programs
    store = cm.artifact.weights
    assert sum(1 for k in store if k.startswith("p_up_weight_hi")) == 1
    assert "p_up_weight_lo" in store and "p_down_weight_lo" in store  # w8 reads 8 bits everywhere
    cm.set_controls(plan="w2")
    w2 = cm(x)
    cm.set_controls(plan="w8")
    assert not torch.equal(cm(x), w2)  # switched between calls, no recompiling
    with pytest.raises(ControlError, match=r"control 'plan' cannot be 'w3'; it allows one of 'w8', 'mixed', 'w2'"):
        cm.set_controls(plan="w3")


def test_the_lo_plane_is_held_only_where_a_plan_reads_8_bits():
    m, x = _mlp()
    q = NestedQuantization(plans={"hi": {"default": 4, "up": 8}, "lo": {"default": 2}})
    cm = kiln.compile(m, (x,), target="torch", options=CompileOptions(quantization=q))
    layers = cm.manifest["quantization"]["layers"]
    assert {v["group"]: v["views"] for v in layers.values()} == {"up": [8, 2], "down": [4, 2], "head": [4, 2]}
    assert "p_up_weight_lo" in cm.artifact.weights and "p_down_weight_lo" not in cm.artifact.weights
    down = next(v for v in layers.values() if v["group"] == "down")
    assert down["bytes"] < 0.3 * down["float_bytes"]  # 4 + 2 bits held in 0.5 B/weight (+ group params) of 4
    assert down["bytes_read"]["2"] < down["bytes_read"]["4"]
    assert down["error"]["2"]["rel_rms"] > down["error"]["4"]["rel_rms"]


def test_a_budget_is_allocated_by_the_measured_sensitivity_of_a_transformer():
    model, (ids,) = zoo.llama(hidden=128, intermediate=256, layers=2)
    calibration = [(torch.randint(0, 256, ids.shape),) for _ in range(2)]
    q = NestedQuantization(plans={"b5": 5.0, "w4": {"default": 4}})
    cm = kiln.compile(model, (ids,), target="torch", options=CompileOptions(quantization=q, calibration=calibration))
    report = cm.manifest["quantization"]
    groups = set(report["sensitivity"])
    assert {"layer0.attention", "layer0.ffn", "layer1.attention", "layer1.ffn", "lm_head"} <= groups
    for errors in report["sensitivity"].values():  # narrower views move the output more
        assert errors["2"] >= errors["4"] >= errors["8"]
    plan = report["plans"]["b5"]
    assert 4.0 <= plan["avg_bits"] <= 5.0 and set(plan["bits"].values()) <= {2, 4, 8}
    with torch.no_grad():
        ref = model(ids).logits
    for name in ("b5", "w4"):
        with cm.using(plan=name):
            out = cm(ids).logits
        assert ((out - ref).norm() / ref.norm()) < 0.2, name


def test_a_policy_switches_the_plan_before_each_call():
    m, x = _mlp()
    cm = kiln.compile(m, (x,), target="torch", options=CompileOptions(quantization=NestedQuantization()))
    seen = []

    def policy(program, controls):
        seen.append((program, dict(controls)))
        return {"plan": ["w2", "w4"][len(seen) % 2]}
    cm.policy = policy
    outs = [cm(x) for _ in range(3)]
    assert [s[1]["plan"] for s in seen] == ["w8", "w4", "w2"]
    with cm.using(plan="w8"):
        pass
    cm.policy = None
    with cm.using(plan="w4"):
        assert torch.equal(cm(x), outs[0])
    with cm.using(plan="w2"):
        assert torch.equal(cm(x), outs[1])


@pytest.mark.parametrize("kwargs, message", [
    ({"views": (8, 3)}, r"views must be some of \(8, 4, 2\)"),
    ({"group_size": 100}, "group_size must be a multiple of 128"),
    ({"plans": {}}, "plans must be a non-empty dict"),
    ({"plans": {"a": 9.0}}, r"plans\['a'\]: a budget of 9.0 bits is outside the views"),
    ({"plans": {"a": {"default": 3}}}, r"plans\['a'\]: bits \{'default': 3\} are not among the views"),
    ({"plans": {"a": {"default": 4}}, "default_plan": "b"}, "default_plan 'b' is not one of the plans"),
])
def test_bad_quantization_options_name_the_field(kwargs, message):
    with pytest.raises(KilnError, match=message):
        NestedQuantization(**kwargs)


def test_a_plan_naming_an_unknown_group_is_refused_with_the_groups():
    m, x = _mlp()
    q = NestedQuantization(plans={"a": {"default": 4, "layer9.ffn": 8}})
    with pytest.raises(KilnError, match=r"names groups \['layer9.ffn'\] the model does not have; its groups: down, "
                                        r"head, up"):
        kiln.compile(m, (x,), target="torch", options=CompileOptions(quantization=q))


def test_plans_survive_save_and_load_in_a_fresh_process(tmp_path, fresh_python):
    m, x = _mlp()
    cm = kiln.compile(m, (x,), target="cpu", options=CompileOptions(quantization=NestedQuantization()))
    path = cm.save(tmp_path / "a")
    save_file({"x": x, **{p: cm.run([x], controls={"plan": p})[0] for p in ("w8", "w4", "w2")}},
              tmp_path / "ref.safetensors")
    out = fresh_python(f"""
        import torch, kiln
        from safetensors.torch import load_file
        ref = load_file({str(tmp_path / 'ref.safetensors')!r})
        m = kiln.load({str(path)!r})
        print(m.controls["plan"].allowed)
        for plan in ("w2", "w8", "w4"):
            m.set_controls(plan=plan)
            assert torch.equal(m(ref["x"]), ref[plan]), plan
        print("ok")
    """)
    assert out.split() == ["('w8',", "'w4',", "'w2')", "ok"]
