"""examples/robot: tokens, the VLA-shaped policy, its configurations and kinematic signals (no Meta-World), and
one short closed loop that needs Meta-World (skipped without it)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.robot import configs as C  # noqa: E402
from examples.robot.kinematics import KinematicSignals  # noqa: E402
from examples.robot.model import (  # noqa: E402
    VLAConfig, VLAPolicy, example_inputs, greedy_decode, load_policy, save_policy,
)
from examples.robot.tokens import (  # noqa: E402
    N_BINS, InstructionTokenizer, actions_to_tokens, instruction, tokens_to_actions,
)

TASKS = ["reach-v3", "pick-place-v3", "drawer-open-v3"]


def small_policy(seed: int = 0) -> tuple[VLAPolicy, InstructionTokenizer]:
    torch.manual_seed(seed)
    tok = InstructionTokenizer.from_texts([instruction(t) for t in TASKS])
    return VLAPolicy(VLAConfig(vocab=len(tok), text_len=tok.length, d_model=128, layers=2)).eval(), tok


def test_action_bins_round_trip_within_half_a_bin():
    a = np.random.default_rng(0).uniform(-1, 1, (1000, 4))
    a[:4] = [[-1, 1, 0, -1], [1, -1, 1, 1], [0.999999, -0.999999, 1e-9, -1e-9], [-1, -1, -1, -1]]
    t = actions_to_tokens(a)
    assert t.dtype == np.int64 and t.min() >= 0 and t.max() <= N_BINS - 1
    assert t[0].tolist() == [0, 255, 128, 0]
    back = tokens_to_actions(t)
    assert np.abs(back - a).max() <= 1 / N_BINS + 1e-6
    assert np.array_equal(actions_to_tokens(back), t)           # bin centres map to their own bins
    assert np.array_equal(actions_to_tokens([[5.0, -7.0, 0, 0]])[0, :2], [255, 0])   # clipped


def test_instruction_tokenizer():
    tok = InstructionTokenizer.from_texts([instruction(t) for t in TASKS])
    ids = tok.encode(instruction("pick-place-v3"))
    assert len(ids) == tok.length and tok.UNK not in ids
    assert tok.decode(ids) == instruction("pick-place-v3")
    unseen = tok.encode("open the window with a hammer")
    assert tok.UNK in unseen and len(unseen) == tok.length
    assert instruction("stick-pull-v3") == "do the task stick pull"
    assert InstructionTokenizer.from_json(tok.to_json()).encode("reach the goal") == tok.encode("reach the goal")


def test_decode_shapes_and_causality():
    model, tok = small_policy()
    text, obs = tok.tensor(instruction("reach-v3")).repeat(3, 1), torch.randn(3, 39)
    acts = torch.randint(0, N_BINS, (3, 4))
    logits = model(text, obs, acts)
    assert logits.shape == (3, 4, N_BINS)
    changed = acts.clone()
    changed[:, 2:] = 0
    # row k reads only the prefix and action tokens before k
    torch.testing.assert_close(model(text, obs, changed)[:, :3], logits[:, :3])
    out = greedy_decode(model, text, obs)
    assert out.shape == (3, 4) and out.dtype == torch.long
    assert torch.equal(out[:, 0], logits[:, 0].argmax(-1))
    torch.testing.assert_close(model(text, obs, out).argmax(-1), out, rtol=0, atol=0)


def test_forward_exports():
    model, _ = small_policy()
    inputs = example_inputs(model.cfg, batch=2)
    inputs = (inputs[0], torch.randn(2, 39), torch.randint(0, N_BINS, (2, 4)))
    ep = torch.export.export(model, inputs)
    torch.testing.assert_close(ep.module()(*inputs), model(*inputs))


def test_save_load_round_trip(tmp_path):
    model, tok = small_policy()
    save_policy(tmp_path, model, tok, {"tasks": TASKS, "provenance": {"command": ["test"]}})
    assert (tmp_path / "policy.safetensors").exists()
    back, tok2, doc = load_policy(tmp_path)
    assert doc["tasks"] == TASKS and tok2.to_json() == tok.to_json() and back.cfg == model.cfg
    inputs = (tok.tensor(instruction("drawer-open-v3")), torch.randn(1, 39), torch.randint(0, N_BINS, (1, 4)))
    assert torch.equal(back(*inputs), model(*inputs))


def test_kiln_configurations_hold_nested_weights_and_switch_plans():
    model, tok = small_policy()
    ctx = C.BuildContext("reach-v3", target="torch")
    text, obs = tok.tensor(instruction("reach-v3")), torch.randn(1, 39)
    acts = torch.randint(0, N_BINS, (1, 4))
    ref = model(text, obs, acts)
    fp32 = C.fp32_bytes(model)
    errors, sizes = {}, {}
    for bits in (8, 4, 2):
        p = C.build(f"static{bits}", model, ctx)
        assert p.select(None).avg_bits == bits and p.name == f"static{bits}"
        out = p.step_fn(p.select(None))(text, obs, acts)
        errors[bits] = ((out - ref).norm() / ref.norm()).item()
        sizes[bits] = p.weight_bytes
    assert errors[8] < 0.03 and errors[8] < errors[4] < errors[2] < 1.0, errors  # random weights, 2 layers
    assert fp32 > sizes[8] > sizes[4] > sizes[2]
    dyq = C.build("dyq", model, ctx)
    assert list(dyq.plans) == list(C.DYQ_PLANS) and sizes[2] < dyq.weight_bytes < sizes[8]
    bits = [dyq.plans[p].avg_bits for p in dyq.plans]
    assert bits == sorted(bits, reverse=True) and bits[-1] == 2  # most to least precise
    with pytest.raises(C.NotAvailable, match="needs the dyq result"):
        C.build("static-matched", model, ctx)


def test_configurations():
    model, tok = small_policy()
    signals = KinematicSignals()
    signals.update(np.zeros(39))
    text, obs = tok.tensor(instruction("reach-v3")), torch.randn(1, 39)
    fp = C.build("fp32", model)
    assert fp.select(signals).avg_bits == 32 and fp.weight_bytes == C.fp32_bytes(model)
    ref = greedy_decode(fp.step_fn(fp.select(signals)), text, obs)
    p = C.build("static4", model, C.BuildContext("reach-v3", target="torch"))
    greedy_decode(p.step_fn(p.select(signals)), text, obs)
    assert torch.equal(greedy_decode(fp.step_fn(fp.select(signals)), text, obs), ref)   # fp32 model untouched
    assert C.run_order(["fp32", "static-matched", "static2", "dyq"]) == ["fp32", "dyq", "static-matched", "static2"]
    assert C.run_order(C.ALL_CONFIGS)[-2:] == ["dyq", "static-matched"]

    class Near:          # a toy selector: 8 bits while slow, 2 bits while fast
        def __init__(self):
            self.calls = 0

        def __call__(self, s):
            self.calls += 1
            return "8" if s.now.speed < 0.5 else "2"

        def reset(self):
            self.calls = 0

    sel = Near()
    sw = C.SwitchingPolicy("toy", {"8": model, "2": model}, {"8": C.Plan("8", 8), "2": C.Plan("2", 2)}, sel, 1)
    sig = KinematicSignals(dt=1.0)
    sig.update(np.zeros(39))
    assert sw.select(sig).name == "8"
    o = np.zeros(39)
    o[0] = 1.0
    sig.update(o)
    assert sw.select(sig).name == "2"
    sw.reset()
    assert sel.calls == 0


def test_kinematic_signals_on_a_synthetic_trajectory():
    dt = 0.0125
    sig = KinematicSignals(dt=dt)
    obj = np.array([0.1, 0.6, 0.02])
    xs = []
    for t in range(8):
        o = np.zeros(39)
        x = 0.01 * t + 0.5 * 0.002 * t**2 if t < 5 else None    # constant acceleration, then constant velocity
        if x is None:
            x = xs[-1] + (xs[-1] - xs[-2])
        xs.append(x)
        o[0:3] = [x, 0.6, 0.2]
        o[3] = 1.0 if t < 4 else 0.3
        o[4:7] = obj
        k = sig.update(o)
        sig.commanded([0, 0, 0, 1.0 if t >= 3 else -1.0])
        if t == 0:
            assert k.speed == k.accel == k.jerk == 0
        if 2 <= t <= 4:
            assert k.accel == pytest.approx(0.002 / dt**2, rel=1e-6)
        if t == 3:
            assert k.jerk == pytest.approx(0.0, abs=1e-6)
    assert sig.now.accel == pytest.approx(0.0, abs=1e-6)
    assert sig.now.speed == pytest.approx((xs[-1] - xs[-2]) / dt)
    events = [(k.step, k.gripper_event) for k in sig.history if k.gripper_event]
    assert events == [(4, "close")]              # commanded at step 3, seen at the next step
    assert sig.history[0].obj_dist == pytest.approx(np.linalg.norm(np.array([0, 0.6, 0.2]) - obj))
    nothing = np.zeros(39)
    assert KinematicSignals().update(nothing).obj_dist == float("inf")
    sig.reset()
    assert sig.now is None


def test_a_gripper_command_near_zero_is_no_event():
    """The learned policy's "leave it open" is the bin nearest 0 (+0.004): not a close; 0.6 (push's grasp) is."""
    sig = KinematicSignals()
    for cmd in [0.004, 0.004, -0.1, 0.25, 0.6, 0.6, 0.1, -0.6]:
        sig.update(np.zeros(39))
        sig.commanded([0, 0, 0, cmd])
    sig.update(np.zeros(39))
    assert [(k.step, k.gripper_event) for k in sig.history if k.gripper_event] == [(5, "close"), (8, "open")]


def test_closed_loop_on_meta_world(tmp_path):
    pytest.importorskip("metaworld")
    from examples.robot import sim

    demos = sim.collect(["reach-v3"], demos=2, max_steps=30)
    assert demos["obs"].shape[1] == 39 and len(demos["obs"]) == len(demos["actions"]) == 60
    sim.save_demos(tmp_path / "d.npz", demos)
    assert sim.load_demos(tmp_path / "d.npz")["tasks"].tolist() == ["reach-v3"]
    assert sim.expert_success("reach-v3", episodes=2, seed=0) == 1.0
    model, tok = small_policy()
    r = sim.evaluate(C.build("fp32", model), tok, "reach-v3", episodes=2, seed=0, max_steps=5,
                     trace=tmp_path / "t.jsonl")
    assert r.steps == 10 and r.plans == {"fp32": 10}
    assert re.fullmatch(r"reach-v3 fp32 success=\d\.\d\d avg_bits=32\.00 weight_bytes=\d+", r.line())
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 10


def test_command_line_end_to_end(tmp_path, capsys):
    pytest.importorskip("metaworld")
    from examples.robot.__main__ import main

    common = ["--tasks", "reach-v3,drawer-open-v3", "--out", str(tmp_path), "--max-steps", "4"]
    main(["collect", *common, "--demos", "1"])
    main(["train", *common, "--steps", "2", "--batch", "8", "--layers", "1"])
    doc = (tmp_path / "policy" / "policy.json").read_text()
    assert '"command"' in doc and '"sources_sha256"' in doc and '"train_seconds"' in doc
    capsys.readouterr()
    main(["eval", *common, "--episodes", "2", "--seed", "3", "--configs", "fp32,static4,dyq"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [[task, config] for task in ("reach-v3", "drawer-open-v3")
                                                for config in ("fp32", "static4", "dyq")]
    assert all(re.fullmatch(r"\S+ \S+ success=\d\.\d\d avg_bits=\d+\.\d\d weight_bytes=\d+", ln) for ln in lines)
    assert (tmp_path / "eval.json").exists()
