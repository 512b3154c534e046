"""Precision policies: choose a bit-width plan per step from signals, and hand it to the runtime as a control.

A compiled DyQ program has an enum control (say ``plan``) whose values are
plan names (``"w8"``, ``"w4-8sens"``, ``"w2-4"``, ...), each a per-layer-group
bit allocation chosen offline. A **precision policy** reads signals once per
control step (:meth:`PrecisionPolicy.observe`) and names the plan the next
calls run with (:meth:`PrecisionPolicy.plan`); :func:`controls_policy` turns
it into the runtime's ``model.policy`` hook, so every call of the program
reads the plan chosen for the current step (a step that decodes several
action tokens makes several calls, all with the step's plan)::

    from kiln.runtime.precision import DyQPolicy

    dyq = DyQPolicy({"w8": 8.0, "w4-8sens": 4.6, "w2-4": 2.9})   # plan -> average bits
    model.policy = dyq.as_controls_policy("plan", model=model)   # checks the names against the control
    for obs in episode:
        dyq.update(obs[0:3], gripper=obs[3], obj=obs[4:7])       # once per env step
        action = model(inputs)                                   # runs with dyq.plan()
    print(dyq.stats)                                             # fractions, switches, average bits

:class:`DyQPolicy` is DyQ-VLA's idea: precision matters when the motion is
fine -- slow, accelerating or decelerating, jerky, near an object, at a
gripper event -- and low precision suffices in coarse transit. Its parts:

- **Signals** (:class:`KinematicTracker` -> :class:`StepSignals`): speed,
  acceleration and jerk of the end effector by backward finite differences
  over the control period ``dt``, each stage smoothed by an EMA (see
  :class:`KinematicTracker`); gripper events (the opening moved by at least
  ``gripper_threshold`` since the last event, or the caller says so);
  distance to the object where it is observed.
- **Score** (:meth:`DyQPolicy.cues`, :meth:`DyQPolicy.score`), in [0, 1], the
  largest of the weighted cues, each clipped to [0, 1]::

      slow      = 1 - speed / speed_scale          (high when slow)
      accel     = accel / accel_scale
      jerk      = jerk / jerk_scale
      proximity = (far - d) / (far - near)         (1 within ``near`` of the object, 0 beyond ``far``;
                                                    0 while the gripper is closed: a held object stays near)
      event     = 1 for ``event_hold`` steps from a gripper event (the event's own step included)
      score     = max(slow_weight * slow, accel_weight * accel, jerk_weight * jerk,
                      proximity_weight * proximity, event)

- **Trigger with hysteresis** (kinematic-guided allocation): the plans are
  ordered from most to least precise; ``thresholds`` (descending, one fewer
  than the plans) split the score range, a score at or above
  ``thresholds[i]`` demanding plan ``i`` or a more precise one. Stepping up
  to more precision is immediate (the safe direction). Stepping down one
  plan needs the score below the threshold minus ``hysteresis`` for ``dwell``
  consecutive steps, so a score oscillating around a threshold does not make
  the plan flap. An episode starts at the most precise plan.

Every constant is a field of :class:`DyQParams`; the defaults are Meta-World
magnitudes (``dt`` 0.0125 s; scales near the median speed and the 95th
percentile of acceleration and jerk of its scripted experts), and
:meth:`DyQParams.calibrate` sets the scales from recorded trajectories.
:class:`PlanStats` counts steps per plan, switches and average bits.

This module is runtime-side: it imports nothing from the compiler, nothing
from examples or simulators, and no numpy (a step is a few 3-vectors).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .executor import ControlError

Vec3 = tuple[float, float, float]
_ZERO: Vec3 = (0.0, 0.0, 0.0)
META_WORLD_DT = 0.0125  # Meta-World's control period: frame_skip 5 x 2.5 ms


# ---------------------------------------------------------------- the interface and the runtime adapter

@runtime_checkable
class PrecisionPolicy(Protocol):
    """Maps signals to a plan, once per control step. Plug in your own: any object with these methods.

    ``plans``: the plan names it may choose (checked against the control by
    :func:`controls_policy` when given a model); ``observe`` reads one step's
    signals (whatever the policy understands); ``plan`` names the plan for
    the calls until the next ``observe``; ``reset`` starts a new episode.
    """

    plans: Sequence[str]

    def observe(self, signals: Any) -> None: ...

    def plan(self) -> str: ...

    def reset(self) -> None: ...


ControlsPolicy = Callable[[str, Mapping[str, object]], "dict[str, object] | None"]


def controls_policy(policy: PrecisionPolicy, control: str = "plan", *, programs: Iterable[str] | None = None,
                    model: Any = None) -> ControlsPolicy:
    """``policy`` as the runtime's hook: ``model.policy = controls_policy(policy, "plan")``.

    Before each call of a program that has the control ``control`` (and is
    one of ``programs``, when given), the hook sets it to ``policy.plan()``;
    other programs are left alone. The runtime checks the value, so a plan the
    control does not allow raises :class:`~kiln.runtime.ControlError` at that
    call. With ``model`` (a ``CompiledModel``), every name in ``policy.plans``
    is checked now against the control of each program that has it (or of
    ``programs``), raising ``ControlError`` before anything runs.
    """
    wanted = None if programs is None else frozenset(programs)
    if model is not None:
        names = wanted if wanted is not None else [n for n, p in model.programs.items() if control in p.controls]
        if not names:
            raise ControlError(f"no program of the model has a control {control!r}")
        for name in names:
            program = model.programs[name]
            if control not in program.controls:
                raise ControlError(f"program {name!r} has no control {control!r}; its controls are "
                                   f"{', '.join(program.controls) or 'none'}")
            for plan in getattr(policy, "plans", ()):
                program.controls[control].check(plan)

    def choose(program: str, controls: Mapping[str, object]) -> dict[str, object] | None:
        if control not in controls or (wanted is not None and program not in wanted):
            return None
        return {control: policy.plan()}

    choose.precision_policy = policy  # type: ignore[attr-defined]  # for whoever inspects model.policy
    return choose


def ordered_plans(plans: Sequence[str] | Mapping[str, float]) -> tuple[tuple[str, ...], dict[str, float] | None]:
    """The plan names from most to least precise, and their average bits if known.

    A sequence is taken as ordered; a mapping ``plan -> average bits`` is
    ordered by bits, highest first (ties keep the mapping's order).
    """
    if isinstance(plans, Mapping):
        bits = {str(k): float(v) for k, v in plans.items()}
        names = tuple(sorted(bits, key=lambda n: -bits[n]))
    else:
        if isinstance(plans, str):
            raise TypeError("plans: a sequence of plan names or a mapping plan -> bits, not one string")
        names, bits = tuple(str(p) for p in plans), None
    if not names:
        raise ValueError("plans: at least one plan")
    if len(set(names)) != len(names):
        raise ValueError(f"plans: names repeat: {list(names)}")
    return names, bits


# ---------------------------------------------------------------- statistics

class PlanStats:
    """Steps per plan, switches and average bits over the steps recorded (every episode since ``clear``).

    ``record(plan)`` once per step; ``new_episode()`` at an episode start, so
    the first plan of an episode is not counted as a switch.
    """

    def __init__(self, plans: Sequence[str], bits: Mapping[str, float] | None = None):
        self.plans = tuple(plans)
        self.bits = dict(bits) if bits is not None else None
        self.clear()

    def clear(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(self.plans, 0)
        self.steps = 0
        self.switches = 0
        self.episodes = 0
        self._last: str | None = None

    def new_episode(self) -> None:
        self._last = None

    def record(self, plan: str) -> None:
        if self._last is None:
            self.episodes += 1
        elif plan != self._last:
            self.switches += 1
        self._last = plan
        self.counts[plan] = self.counts.get(plan, 0) + 1
        self.steps += 1

    def fractions(self) -> dict[str, float]:
        """The fraction of steps at each plan (0 for every plan before any step)."""
        return {p: c / self.steps if self.steps else 0.0 for p, c in self.counts.items()}

    def avg_bits(self) -> float | None:
        """The mean over steps of the plan's average bits; None without bits or steps."""
        if self.bits is None or not self.steps:
            return None
        return sum(self.bits[p] * c for p, c in self.counts.items()) / self.steps

    def summary(self) -> dict:
        return {"steps": self.steps, "episodes": self.episodes, "switches": self.switches,
                "fractions": self.fractions(), "avg_bits": self.avg_bits()}

    def __str__(self) -> str:
        avg = self.avg_bits()
        fractions = " ".join(f"{p}={f:.3f}" for p, f in self.fractions().items())
        return (f"steps={self.steps} {fractions} switches={self.switches}"
                + (f" avg_bits={avg:.3f}" if avg is not None else ""))


# ---------------------------------------------------------------- kinematic signals

@dataclass(frozen=True)
class StepSignals:
    """One control step's kinematic signals (SI units: m, m/s, m/s^2, m/s^3).

    ``speed`` / ``accel`` / ``jerk`` are 0 until the tracker has 2 / 3 / 4
    positions; ``object_distance`` is None where no object is observed;
    ``gripper`` is None where no gripper reading was given.
    """
    step: int
    position: Vec3
    speed: float
    accel: float
    jerk: float
    gripper: float | None = None
    gripper_event: bool = False
    object_distance: float | None = None


def _vec3(x: Any, what: str) -> Vec3:
    v = tuple(float(c) for c in list(x)[:3])
    if len(v) != 3:
        raise ValueError(f"{what}: 3 coordinates, got {len(v)}")
    return v  # type: ignore[return-value]


def _diff(a: Vec3, b: Vec3, dt: float) -> Vec3:
    return ((a[0] - b[0]) / dt, (a[1] - b[1]) / dt, (a[2] - b[2]) / dt)


def _ema(old: Vec3 | None, new: Vec3, alpha: float) -> Vec3:
    if old is None:
        return new
    return (old[0] + alpha * (new[0] - old[0]), old[1] + alpha * (new[1] - old[1]), old[2] + alpha * (new[2] - old[2]))


def _norm(v: Vec3) -> float:
    return math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


class KinematicTracker:
    """Running kinematic signals of one trajectory: ``update(...)`` once per control step.

    Finite differences, each stage EMA-smoothed with weight ``smoothing`` on
    the newest value (``x_s = x_s + smoothing * (x_raw - x_s)``, started at
    the first raw value; ``smoothing=1`` is no smoothing)::

        v_raw = (p_t - p_{t-1}) / dt      v = EMA(v_raw)
        a_raw = (v_t - v_{t-1}) / dt      a = EMA(a_raw)      (v: the smoothed velocities)
        j_raw = (a_t - a_{t-1}) / dt      j = EMA(j_raw)

    so with ``smoothing=1`` they are the backward differences of p (for
    ``p_t = t^3``, dt 1: v = 3t^2 - 3t + 1, a = 6t - 6, j = 6). A gripper
    event is an opening that moved by at least ``gripper_threshold`` since
    the last event (or the first reading), or ``event=True`` from the caller
    (e.g. the sign of the commanded gripper changed).
    """

    def __init__(self, dt: float = META_WORLD_DT, smoothing: float = 0.5, gripper_threshold: float = 0.2):
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.dt, self.smoothing, self.gripper_threshold = dt, smoothing, gripper_threshold
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self._p: Vec3 | None = None
        self._v: Vec3 | None = None
        self._a: Vec3 | None = None
        self._j: Vec3 | None = None
        self._gripper_ref: float | None = None

    def update(self, position: Any, gripper: float | None = None, obj: Any = None, *,
               object_distance: float | None = None, event: bool = False) -> StepSignals:
        """One step: ``position`` (3 coordinates; numpy, torch or a sequence), the gripper opening, and the
        object's position ``obj`` or its distance ``object_distance`` (None or inf: not observed)."""
        p, dt, alpha = _vec3(position, "position"), self.dt, self.smoothing
        if self._p is not None:
            v = _ema(self._v, _diff(p, self._p, dt), alpha)
            if self._v is not None:
                a = _ema(self._a, _diff(v, self._v, dt), alpha)
                if self._a is not None:
                    self._j = _ema(self._j, _diff(a, self._a, dt), alpha)
                self._a = a
            self._v = v
        self._p = p
        if gripper is not None:
            gripper = float(gripper)
            if self._gripper_ref is None:
                self._gripper_ref = gripper
            elif abs(gripper - self._gripper_ref) >= self.gripper_threshold:
                event, self._gripper_ref = True, gripper
        if obj is not None:
            object_distance = _norm(_diff(p, _vec3(obj, "obj"), 1.0))
        elif object_distance is not None and not math.isfinite(float(object_distance)):
            object_distance = None
        signals = StepSignals(self.step, p, _norm(self._v or _ZERO), _norm(self._a or _ZERO), _norm(self._j or _ZERO),
                              gripper, bool(event), None if object_distance is None else float(object_distance))
        self.step += 1
        return signals


def track(positions: Iterable[Any], dt: float = META_WORLD_DT, smoothing: float = 0.5) -> list[StepSignals]:
    """The signals of a whole recorded trajectory of positions (no gripper, no object)."""
    tracker = KinematicTracker(dt, smoothing)
    return [tracker.update(p) for p in positions]


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    s = sorted(xs)
    h = (len(s) - 1) * q
    lo = math.floor(h)
    return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


# ---------------------------------------------------------------- the DyQ policy

@dataclass(frozen=True)
class DyQParams:
    """Every constant of :class:`DyQPolicy` (defaults: Meta-World magnitudes; units m, s)."""
    dt: float = META_WORLD_DT          # control period (s)
    smoothing: float = 0.5             # EMA weight of the newest finite difference (1: none)
    speed_scale: float = 0.5           # m/s; the slow cue is 1 - speed / speed_scale (experts' median ~0.5)
    accel_scale: float = 15.0          # m/s^2; the accel cue is accel / accel_scale (experts' 95th pct ~15)
    jerk_scale: float = 800.0          # m/s^3; the jerk cue is jerk / jerk_scale (experts' 95th pct ~800)
    near: float = 0.05                 # m; proximity cue 1 within this distance of the object ...
    far: float = 0.10                  # m; ... falling linearly to 0 at this one
    proximity_open: float | None = 0.8  # the proximity cue counts only while the gripper opening is >= this
    #                                     (Meta-World: ~1 open; a held object stays near); None: always
    gripper_threshold: float = 0.2     # a gripper opening change this large is an event
    event_hold: int = 10               # steps the event cue stays at 1 from an event (its step included)
    slow_weight: float = 1.0           # each cue's weight in the max
    accel_weight: float = 1.0
    jerk_weight: float = 1.0
    proximity_weight: float = 1.0
    thresholds: tuple[float, ...] | None = None  # descending, one per plan but the last: score >= thresholds[i]
    #                                               demands plan i or better; None: (n-1)/n, ..., 1/n for n plans
    hysteresis: float = 0.15           # stepping down needs the score below threshold - hysteresis ...
    dwell: int = 8                     # ... for this many consecutive steps (then one plan down)

    def __post_init__(self):
        for name in ("dt", "speed_scale", "accel_scale", "jerk_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DyQParams.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"DyQParams.smoothing must be in (0, 1], got {self.smoothing}")
        if not 0 <= self.near < self.far:
            raise ValueError(f"DyQParams: need 0 <= near < far, got near={self.near} far={self.far}")
        if self.event_hold < 0 or self.dwell < 1 or self.hysteresis < 0:
            raise ValueError(f"DyQParams: need event_hold >= 0, dwell >= 1, hysteresis >= 0; got "
                             f"{self.event_hold}, {self.dwell}, {self.hysteresis}")

    def levels(self, n: int) -> tuple[float, ...]:
        """The thresholds for ``n`` plans: ``thresholds``, or ``(n-1)/n, (n-2)/n, ..., 1/n``."""
        t = self.thresholds if self.thresholds is not None else tuple((n - 1 - i) / n for i in range(n - 1))
        if len(t) != n - 1:
            raise ValueError(f"DyQParams.thresholds: {n - 1} for {n} plans, got {len(t)}: {t}")
        if any(not b < a for a, b in zip(t, t[1:])) or (t and not (t[-1] > self.hysteresis and t[0] <= 1)):
            raise ValueError(f"DyQParams.thresholds must descend within (hysteresis={self.hysteresis}, 1]: {t}")
        return tuple(t)

    def calibrate(self, trajectories: Iterable[Iterable[Any]], speed_quantile: float = 0.5,
                  accel_quantile: float = 0.95, jerk_quantile: float = 0.95) -> DyQParams:
        """A copy with ``speed_scale`` / ``accel_scale`` / ``jerk_scale`` set to these quantiles of the signals of
        recorded ``trajectories`` (each a sequence of positions, e.g. a (T, 3) array), as the tracker computes
        them (this ``dt`` and ``smoothing``; a signal counts from the step it is defined)."""
        speeds: list[float] = []
        accels: list[float] = []
        jerks: list[float] = []
        for trajectory in trajectories:
            for s in track(trajectory, self.dt, self.smoothing):
                speeds += [s.speed] if s.step >= 1 else []
                accels += [s.accel] if s.step >= 2 else []
                jerks += [s.jerk] if s.step >= 3 else []
        if not jerks:
            raise ValueError("calibrate: no trajectory has 4 or more positions")
        scales = {"speed_scale": _quantile(speeds, speed_quantile), "accel_scale": _quantile(accels, accel_quantile),
                  "jerk_scale": _quantile(jerks, jerk_quantile)}
        bad = [n for n, v in scales.items() if not v > 0]
        if bad:
            raise ValueError(f"calibrate: the trajectories give {', '.join(bad)} of 0 (do they move?)")
        return dataclasses.replace(self, **scales)


class DyQPolicy:
    """DyQ-VLA's kinematic precision policy (module docstring: the signals, score and trigger).

    ``plans``: names from most to least precise, or a mapping plan -> average
    bits (ordered by bits); ``bits`` gives the average bits for a sequence.
    Feed it once per control step with :meth:`update` (raw positions), with
    :meth:`observe` (precomputed :class:`StepSignals`), or call it with an
    object carrying ``ee_pos`` (and optionally ``gripper``, ``obj_dist``,
    ``gripper_event``) or one whose ``now`` does (e.g. ``examples/robot``'s
    ``KinematicSignals``): ``policy(signals) -> plan name``.
    """

    def __init__(self, plans: Sequence[str] | Mapping[str, float], params: DyQParams | None = None, *,
                 bits: Mapping[str, float] | None = None):
        self.plans, plan_bits = ordered_plans(plans)
        bits = plan_bits if plan_bits is not None else bits
        if bits is not None and set(bits) != set(self.plans):
            raise ValueError(f"bits: one value per plan {list(self.plans)}, got {list(bits)}")
        self.bits = None if bits is None else {p: float(bits[p]) for p in self.plans}
        self.params = params or DyQParams()
        self.stats = PlanStats(self.plans, self.bits)
        self.reset()

    @property
    def params(self) -> DyQParams:
        return self._params

    @params.setter
    def params(self, params: DyQParams) -> None:
        self._up = params.levels(len(self.plans))
        self._down = tuple(t - params.hysteresis for t in self._up)
        self._params = params
        self.tracker = KinematicTracker(params.dt, params.smoothing, params.gripper_threshold)

    def calibrate(self, trajectories: Iterable[Iterable[Any]], **quantiles: float) -> DyQPolicy:
        """Set the scales from recorded trajectories (:meth:`DyQParams.calibrate`) and reset; returns self."""
        self.params = self.params.calibrate(trajectories, **quantiles)
        self.reset()
        return self

    def reset(self) -> None:
        """A new episode: clears the signals and the trigger (back to the most precise plan); keeps ``stats``."""
        self.tracker.reset()
        self._index = 0
        self._calm = 0
        self._hold = 0
        self.last_score: float | None = None
        self.stats.new_episode()

    def plan(self) -> str:
        return self.plans[self._index]

    def cues(self, signals: StepSignals) -> dict[str, float]:
        """Each cue of ``signals``, weighted and clipped to [0, 1] (the event cue reads the hold counter)."""
        p = self.params
        proximity = 0.0
        d = signals.object_distance
        if d is not None and (p.proximity_open is None or signals.gripper is None
                              or signals.gripper >= p.proximity_open):
            proximity = (p.far - d) / (p.far - p.near)
        clip = _clip01
        return {"slow": p.slow_weight * clip(1 - signals.speed / p.speed_scale),
                "accel": p.accel_weight * clip(signals.accel / p.accel_scale),
                "jerk": p.jerk_weight * clip(signals.jerk / p.jerk_scale),
                "proximity": p.proximity_weight * clip(proximity),
                "event": 1.0 if self._hold > 0 or (signals.gripper_event and p.event_hold > 0) else 0.0}

    def score(self, signals: StepSignals) -> float:
        return max(self.cues(signals).values())

    def observe(self, signals: StepSignals) -> None:
        """One step's signals: update the event hold, score them, move the trigger, record the plan."""
        if signals.gripper_event:
            self._hold = self.params.event_hold
        s = self.score(signals)
        self._hold = max(self._hold - 1, 0)
        self.last_score = s
        demanded = _level(s, self._up)
        if demanded < self._index:           # more precision: now
            self._index, self._calm = demanded, 0
        elif _level(s, self._down) > self._index:  # calm enough to step down: after `dwell` such steps
            self._calm += 1
            if self._calm >= self.params.dwell:
                self._index, self._calm = self._index + 1, 0
        else:
            self._calm = 0
        self.stats.record(self.plan())

    def update(self, position: Any, gripper: float | None = None, obj: Any = None, *,
               object_distance: float | None = None, event: bool = False) -> str:
        """Track one step's raw state (:meth:`KinematicTracker.update`), observe it; returns the plan."""
        self.observe(self.tracker.update(position, gripper, obj, object_distance=object_distance, event=event))
        return self.plan()

    def __call__(self, signals: Any) -> str:
        """``policy(signals) -> plan``: a :class:`StepSignals`, or an object with ``ee_pos`` (optionally
        ``gripper``, ``obj_dist``, ``gripper_event``), or one whose ``now`` is either."""
        k = getattr(signals, "now", signals)
        if isinstance(k, StepSignals):
            self.observe(k)
            return self.plan()
        return self.update(k.ee_pos, getattr(k, "gripper", None), object_distance=getattr(k, "obj_dist", None),
                           event=bool(getattr(k, "gripper_event", False)))

    def as_controls_policy(self, control: str = "plan", *, programs: Iterable[str] | None = None,
                           model: Any = None) -> ControlsPolicy:
        """This policy as ``model.policy`` (:func:`controls_policy`)."""
        return controls_policy(self, control, programs=programs, model=model)

    def __repr__(self) -> str:
        return f"<DyQPolicy plans={list(self.plans)} plan={self.plan()!r} {self.params}>"


def _clip01(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


def _level(score: float, thresholds: Sequence[float]) -> int:
    """The most precise plan ``score`` reaches: the first i with score >= thresholds[i], else the last plan."""
    for i, t in enumerate(thresholds):
        if score >= t:
            return i
    return len(thresholds)
