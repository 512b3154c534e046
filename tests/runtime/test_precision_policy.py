"""kiln.runtime.precision: kinematic signals, the DyQ policy's triggers and hysteresis on synthetic trajectories,
its statistics, and the adapter that makes a precision policy the runtime's controls policy."""
import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kiln
from kiln.runtime import CompiledModel, ControlError
from kiln.runtime.artifact import declare_control
from kiln.runtime.precision import (DyQParams, DyQPolicy, KinematicTracker, PlanStats, PrecisionPolicy, StepSignals,
                                    controls_policy, ordered_plans, track)

DT = 0.0125
PLANS = {"w8": 8.0, "w4": 4.0}


# ---------------------------------------------------------------- finite differences

@pytest.mark.parametrize("dt", [1.0, 0.5])
def test_unsmoothed_signals_are_the_backward_differences_of_t_cubed(dt):
    direction = (2 / 3, -1 / 3, 2 / 3)  # a unit vector: the norms are those of the 1-d case
    signals = track([tuple(t**3 * c for c in direction) for t in range(8)], dt=dt, smoothing=1.0)
    for s in signals:
        t = s.step
        assert s.speed == pytest.approx((3 * t * t - 3 * t + 1) / dt if t >= 1 else 0.0)
        assert s.accel == pytest.approx((6 * t - 6) / dt**2 if t >= 2 else 0.0)
        assert s.jerk == pytest.approx(6 / dt**3 if t >= 3 else 0.0)
        assert s.object_distance is None and s.gripper is None and not s.gripper_event


def test_each_difference_is_ema_smoothed_from_its_first_value():
    # 1-d positions 0, 1, 3, 3 with smoothing 0.5, dt 1, by hand:
    # v: raw 1 -> 1; raw 2 -> 1.5; raw 0 -> 0.75
    # a: raw (1.5 - 1) = 0.5 -> 0.5; raw (0.75 - 1.5) = -0.75 -> 0.5 + 0.5 * (-1.25) = -0.125
    # j: raw (-0.125 - 0.5) = -0.625 -> -0.625
    s = track([(0, 0, 0), (1, 0, 0), (3, 0, 0), (3, 0, 0)], dt=1.0, smoothing=0.5)
    assert [x.speed for x in s] == pytest.approx([0, 1, 1.5, 0.75])
    assert [x.accel for x in s] == pytest.approx([0, 0, 0.5, 0.125])
    assert [x.jerk for x in s] == pytest.approx([0, 0, 0, 0.625])


def test_gripper_events_object_distance_and_inputs():
    tr = KinematicTracker(dt=1.0, smoothing=1.0, gripper_threshold=0.2)
    openings = [1.0, 0.95, 0.9, 0.85, 0.79, 0.7, 0.6, 0.59, 0.59]  # a slow close: one event per 0.2 moved
    events = [tr.update((0, 0, 0), g).gripper_event for g in openings]
    assert events == [False, False, False, False, True, False, False, True, False]
    assert tr.update((0, 0, 0), 0.59, event=True).gripper_event  # the caller's own event (a commanded change)
    s = tr.update(torch.tensor([1.0, 2.0, 2.0]), obj=[0.0, 0.0, 0.0])  # a torch position, a list object
    assert s.object_distance == pytest.approx(3.0) and s.position == (1.0, 2.0, 2.0)
    assert tr.update((0, 0, 0), object_distance=math.inf).object_distance is None  # inf: not observed
    assert tr.update((0, 0, 0), object_distance=0.25).object_distance == 0.25
    with pytest.raises(ValueError, match="3 coordinates"):
        tr.update((0, 0))
    with pytest.raises(ValueError, match="smoothing"):
        KinematicTracker(smoothing=0)


# ---------------------------------------------------------------- synthetic episodes

def _episode():
    """Positions, gripper openings and object positions of a pick: fast transit along x (0.8 m/s, 40 steps), a
    deceleration (16 steps) into a slow approach (0.05 m/s, 20 steps) ending at the object, a close in place
    (6 steps), then a fast lift along z carrying the object (40 steps). Returns (steps, phase of each step)."""
    speeds = [0.8] * 40 + [0.8 - 0.75 * (i + 1) / 16 for i in range(16)] + [0.05] * 20
    phases = ["transit"] * 40 + ["decel"] * 16 + ["approach"] * 20
    p, path = [0.0, 0.0, 0.1], []
    for v in speeds:
        path.append(tuple(p))
        p[0] += v * DT
    obj = tuple(path[-1][:2]) + (0.08,)  # 2 cm below the gripper at the end of the approach
    steps = [(q, 1.0, obj) for q in path]
    closing = [1.0, 0.85, 0.7, 0.55, 0.45, 0.4]
    steps += [(path[-1], g, obj) for g in closing]
    phases += ["close"] * len(closing)
    q = list(path[-1])
    for _ in range(40):
        q[2] += 0.8 * DT
        steps.append((tuple(q), 0.4, (q[0], q[1], q[2] - 0.02)))  # the object moves with the gripper
        phases.append("lift")
    return steps, phases


def test_dyq_is_low_in_transit_high_in_approach_and_grasp_and_low_again_carrying():
    dyq = DyQPolicy(PLANS)
    steps, phases = _episode()
    plans = [dyq.update(p, gripper=g, obj=o) for p, g, o in steps]
    by_phase = {ph: [pl for pl, x in zip(plans, phases) if x == ph] for ph in dict.fromkeys(phases)}
    assert plans[0] == "w8"  # an episode starts precise
    assert set(by_phase["transit"][20:]) == {"w4"}, by_phase["transit"]  # coarse transit, once the start settled
    assert set(by_phase["approach"]) == {"w8"} and set(by_phase["close"]) == {"w8"}
    assert set(by_phase["lift"][-15:]) == {"w4"}  # carrying fast: a held object's nearness does not count
    assert dyq.stats.steps == len(steps) and dyq.stats.switches <= 5, dyq.stats


def test_a_gripper_event_holds_the_precise_plan_for_event_hold_then_dwell():
    params = DyQParams(event_hold=6, dwell=4)
    dyq = DyQPolicy(PLANS, params)
    x = 0.0
    plans = []
    for t in range(60):  # constant fast motion, no object: only the event calls for precision
        x += 0.8 * DT
        plans.append(dyq.update((x, 0, 0), gripper=1.0 if t < 30 else 0.4))
    e = 30
    assert plans[e - 5:e] == ["w4"] * 5
    # event cue 1 for steps e .. e+5 (6 steps); calm from e+6; the 4th calm step (e+9) steps down
    assert plans[e:e + 9] == ["w8"] * 9 and plans[e + 9:] == ["w4"] * (60 - e - 9)


def _signals_with_score(score: float, params: DyQParams, step: int = 0) -> StepSignals:
    """Signals whose only cue is the slow one, at ``score``."""
    return StepSignals(step, (0.0, 0.0, 0.0), params.speed_scale * (1 - score), 0.0, 0.0)


def test_hysteresis_keeps_a_score_oscillating_around_the_threshold_from_flapping():
    params = DyQParams()
    dyq = DyQPolicy(PLANS, params)
    for _ in range(20):
        dyq.observe(_signals_with_score(0.0, params))
    assert dyq.plan() == "w4"
    dyq.stats.clear()
    for t in range(200):  # 0.45 / 0.55 around the threshold 0.5: up once, never below 0.5 - 0.15
        dyq.observe(_signals_with_score(0.55 if t % 2 else 0.45, params))
    assert dyq.stats.switches == 1 and dyq.plan() == "w8"

    rng = random.Random(0)
    noisy = [rng.uniform(0.0, 0.6) for _ in range(400)]  # above 0.5 one step in 6
    flappy = DyQPolicy(PLANS, DyQParams(hysteresis=0.0, dwell=1))
    steady = DyQPolicy(PLANS, DyQParams(dwell=4))
    plans = []
    for s in noisy:
        flappy.observe(_signals_with_score(s, params))
        steady.observe(_signals_with_score(s, params))
        plans.append(steady.plan())
    assert flappy.stats.switches > 100  # without hysteresis it follows the noise
    assert 0 < steady.stats.switches < flappy.stats.switches / 3, (steady.stats, flappy.stats)
    downs = [i for i in range(1, len(plans)) if (plans[i - 1], plans[i]) == ("w8", "w4")]
    assert downs and all(max(noisy[i - 3:i + 1]) < 0.5 - params.hysteresis for i in downs)  # 4 calm steps each
    ups = [i for i in range(1, len(plans)) if (plans[i - 1], plans[i]) == ("w4", "w8")]
    assert all(noisy[i] >= 0.5 for i in ups)


def test_stepping_up_is_immediate_and_stepping_down_goes_one_plan_per_dwell():
    params = DyQParams(dwell=5)
    dyq = DyQPolicy({"w8": 8, "w4": 4, "w2": 2}, params)  # thresholds 2/3, 1/3
    assert dyq.plans == ("w8", "w4", "w2")
    seen = [dyq.observe(_signals_with_score(0.0, params)) or dyq.plan() for _ in range(10)]
    assert seen == ["w8"] * 4 + ["w4"] * 5 + ["w2"]  # one plan down per 5 calm steps
    dyq.observe(_signals_with_score(0.5, params))  # demands w4: immediately
    assert dyq.plan() == "w4"
    for _ in range(10):
        dyq.observe(_signals_with_score(0.0, params))
    dyq.observe(_signals_with_score(0.9, params))  # demands w8: from w2 in one step
    assert dyq.plan() == "w8" and dyq.last_score == pytest.approx(0.9)
    assert DyQPolicy(PLANS, DyQParams(thresholds=(0.3,))).observe(_signals_with_score(0.35, params)) is None


def test_reset_starts_a_new_episode_and_keeps_the_statistics():
    dyq = DyQPolicy(PLANS)
    x = 0.0
    for _ in range(40):
        x += 0.8 * DT
        dyq.update((x, 0, 0))
    assert dyq.plan() == "w4" and dyq.stats.switches == 1
    dyq.reset()
    assert dyq.plan() == "w8" and dyq.tracker.step == 0
    s = dyq.tracker.update((5.0, 0, 0))
    assert s.step == 0 and s.speed == 0.0  # no velocity from the previous episode's last position
    dyq.observe(s)
    assert dyq.stats.steps == 41 and dyq.stats.episodes == 2 and dyq.stats.switches == 1  # no switch at the reset


def test_calibrate_sets_the_scales_from_recorded_trajectories():
    cubic = [(t**3, 0, 0) for t in range(6)]  # dt 1, unsmoothed: speeds 1 7 19 37 61, accels 6 12 18 24, jerk 6
    params = DyQParams(dt=1.0, smoothing=1.0).calibrate([cubic])
    assert (params.speed_scale, params.accel_scale, params.jerk_scale) == pytest.approx((19, 23.1, 6))
    assert params.calibrate([cubic], speed_quantile=1.0).speed_scale == 61
    dyq = DyQPolicy(PLANS, DyQParams(dt=1.0, smoothing=1.0)).calibrate([cubic, cubic])
    assert dyq.params.speed_scale == pytest.approx(19)
    with pytest.raises(ValueError, match="speed_scale"):
        DyQParams().calibrate([[(0, 0, 0)] * 10])
    with pytest.raises(ValueError, match="4 or more"):
        DyQParams().calibrate([[(0, 0, 0)] * 3])


def test_params_and_plans_are_checked():
    with pytest.raises(ValueError, match="1 for 2 plans"):
        DyQPolicy(PLANS, DyQParams(thresholds=(0.6, 0.3)))
    with pytest.raises(ValueError, match="descend"):
        DyQPolicy(["a", "b", "c"], DyQParams(thresholds=(0.3, 0.6)))
    with pytest.raises(ValueError, match="near < far"):
        DyQParams(near=0.2, far=0.1)
    with pytest.raises(ValueError, match="repeat"):
        DyQPolicy(["a", "a"])
    with pytest.raises(ValueError, match="one value per plan"):
        DyQPolicy(["a", "b"], bits={"a": 8})
    assert ordered_plans({"w2-4": 2.9, "w8": 8, "w4-8sens": 4.6}) == (
        ("w8", "w4-8sens", "w2-4"), {"w2-4": 2.9, "w8": 8.0, "w4-8sens": 4.6})
    assert ordered_plans(["hi", "lo"]) == (("hi", "lo"), None)


def test_plan_statistics():
    stats = PlanStats(["w8", "w4"], {"w8": 8, "w4": 4})
    for p in ["w8", "w8", "w4", "w4", "w4", "w8"]:
        stats.record(p)
    stats.new_episode()
    for p in ["w4", "w4"]:
        stats.record(p)
    assert stats.fractions() == {"w8": 3 / 8, "w4": 5 / 8}
    assert stats.switches == 2 and stats.episodes == 2 and stats.avg_bits() == pytest.approx(5.5)
    assert str(stats) == "steps=8 w8=0.375 w4=0.625 switches=2 avg_bits=5.500"
    assert PlanStats(["a"]).avg_bits() is None and PlanStats(["a"]).fractions() == {"a": 0.0}


def test_called_with_an_objects_kinematics_like_examples_robot():
    """``policy(signals)`` as ``examples/robot``'s ``SwitchingPolicy`` selector: ``signals.now`` has ``ee_pos``,
    ``gripper``, ``obj_dist`` (inf without an object) and ``gripper_event`` ("close" / "open" / None)."""
    a, b = DyQPolicy(PLANS), DyQPolicy(PLANS)
    steps, _ = _episode()
    for i, (p, g, o) in enumerate(steps):
        d = math.dist(p, o)
        now = SimpleNamespace(ee_pos=p, gripper=g, obj_dist=d, gripper_event="close" if i == 80 else None)
        assert a(SimpleNamespace(now=now)) == b.update(p, gripper=g, object_distance=d, event=i == 80)
    assert a.stats.counts == b.stats.counts
    tracked = KinematicTracker()
    assert a(tracked.update((0, 0, 0))) == a.plan()  # StepSignals: observed as they are


# ---------------------------------------------------------------- as the runtime's controls policy

class AddPlan(nn.Module):
    def forward(self, x, plan):
        return x * 2 + plan


@pytest.fixture(scope="module")
def plan_model():
    """A compiled program whose enum control ``plan`` (w8 / w4 / w2) feeds its index: out = 2x + index."""
    x = torch.randn(3, 4)
    cm = kiln.compile(AddPlan(), (x, torch.tensor(0)), target="torch")
    declare_control(cm.artifact.manifest["programs"]["main"], "plan", default="w8", values=["w8", "w4", "w2"])
    return x, cm.artifact


def test_the_dyq_choice_reaches_the_program_at_every_call(plan_model):
    x, artifact = plan_model
    cm = CompiledModel(artifact)
    dyq = DyQPolicy({"w8": 8, "w4": 4, "w2": 2})
    cm.policy = dyq.as_controls_policy("plan", model=cm)
    index = {"w8": 0, "w4": 1, "w2": 2}
    seen = set()
    xpos = 0.0
    for _ in range(40):
        xpos += 0.8 * DT
        plan = dyq.update((xpos, 0, 0))
        for _ in range(2):  # a step decoding two tokens: both calls run with the step's plan
            assert torch.equal(cm(x), x * 2 + index[plan])
        assert cm.controls["plan"].value == plan
        seen.add(plan)
    assert seen == {"w8", "w4", "w2"}


def test_a_user_defined_precision_policy_drives_the_control(plan_model):
    x, artifact = plan_model

    class Threshold:
        """Precise whenever the last speed was below 0.1."""
        plans = ("w8", "w2")

        def __init__(self):
            self.reset()

        def observe(self, signals):
            self._slow = signals.speed < 0.1

        def plan(self):
            return "w8" if self._slow else "w2"

        def reset(self):
            self._slow = True

    mine = Threshold()
    assert isinstance(mine, PrecisionPolicy)
    cm = CompiledModel(artifact)
    cm.policy = controls_policy(mine, "plan", model=cm)
    assert torch.equal(cm(x), x * 2)
    mine.observe(StepSignals(1, (0, 0, 0), 0.5, 0, 0))
    assert torch.equal(cm(x), x * 2 + 2)
    assert cm.policy.precision_policy is mine


def test_plan_names_the_control_does_not_allow_raise_control_error(plan_model):
    x, artifact = plan_model
    cm = CompiledModel(artifact)
    bad = DyQPolicy(["w8", "w3"])
    with pytest.raises(ControlError, match=r"control 'plan' cannot be 'w3'; it allows one of 'w8', 'w4', 'w2'"):
        bad.as_controls_policy("plan", model=cm)  # checked up front with the model
    with pytest.raises(ControlError, match="no program of the model has a control 'bits'"):
        DyQPolicy(PLANS).as_controls_policy("bits", model=cm)
    with pytest.raises(ControlError, match="program 'main' has no control 'bits'"):
        DyQPolicy(PLANS).as_controls_policy("bits", programs=["main"], model=cm)
    cm.policy = controls_policy(SimpleNamespace(plan=lambda: "w3"), "plan")  # unchecked: the call refuses it
    with pytest.raises(ControlError, match="cannot be 'w3'"):
        cm(x)
    assert cm.controls["plan"].value == "w8"


def test_programs_without_the_control_or_not_named_are_left_alone(plan_model):
    x, artifact = plan_model
    cm = CompiledModel(artifact)
    chooser = controls_policy(SimpleNamespace(plan=lambda: "w2"), "plan")
    assert chooser("main", {"other": 1}) is None and chooser("main", {"plan": "w8"}) == {"plan": "w2"}
    cm.policy = controls_policy(SimpleNamespace(plan=lambda: "w2"), "plan", programs=["decode"])
    assert torch.equal(cm(x), x * 2)  # main is not one of `programs`: its control keeps its value
