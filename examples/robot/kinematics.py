"""Kinematic signals of a Meta-World episode, step by step: what a DyQ precision policy reads.

Meta-World's 39-d observation holds the end-effector position (``obs[0:3]``),
the gripper opening (``obs[3]``, about 1 open .. 0 closed) and the first
object's position (``obs[4:7]``). :class:`KinematicSignals` is fed each
observation (and the action the policy then commanded) and keeps the derived
signals DyQ-VLA switches on: speed, acceleration and jerk of the end effector
(finite differences over the control period ``dt``), gripper open / close
events, and distance to the object. It is plain numpy, one instance per
episode (``reset`` at the start); a policy reads ``signals.now`` (the latest
:class:`Kinematics`) or ``signals.history``.

Units: metres and seconds (``dt`` = Meta-World's 0.0125 s control period by
default); the first steps of an episode have no acceleration / jerk yet (0).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

META_WORLD_DT = 0.0125   # frame_skip 5 x 2.5 ms
GRIPPER_DEADBAND = 0.25  # |gripper command| at or below this is no open / close command (the experts: 0, 0.6, 1)


@dataclass(frozen=True)
class Kinematics:
    step: int
    ee_pos: tuple[float, float, float]
    gripper: float                  # obs[3]: opening of the fingers
    speed: float                    # |v| (m/s)
    accel: float                    # |a| (m/s^2)
    jerk: float                     # |j| (m/s^3)
    obj_dist: float                 # |ee - obj| (m); inf where the task has no object (obs[4:7] all zero)
    gripper_cmd: float              # the previous step's gripper command: +1 close, -1 open (-1 before any;
    #                                 a command within GRIPPER_DEADBAND of 0 keeps the previous one)
    gripper_event: str | None       # "close" / "open" when the commanded gripper changed sign at the previous step

    def to_json(self) -> dict:
        return asdict(self)


class KinematicSignals:
    """Running kinematic signals of one episode; ``update(obs)`` once per env step, before the policy acts,
    and ``commanded(action)`` after it (so the next step sees gripper events)."""

    def __init__(self, dt: float = META_WORLD_DT, keep: int | None = None):
        self.dt = dt
        self.keep = keep
        self.reset()

    def reset(self) -> None:
        self.history: list[Kinematics] = []
        self._pos: list[np.ndarray] = []   # the last 4 positions (for v, a, j)
        self._cmd = -1.0        # Meta-World starts with the gripper open
        self._prev_cmd = -1.0

    @property
    def now(self) -> Kinematics | None:
        return self.history[-1] if self.history else None

    def update(self, obs) -> Kinematics:
        obs = np.asarray(obs, dtype=np.float64)
        p = obs[0:3].copy()
        self._pos = (self._pos + [p])[-4:]
        ps, dt = self._pos, self.dt
        v = (ps[-1] - ps[-2]) / dt if len(ps) >= 2 else np.zeros(3)
        a = (ps[-1] - 2 * ps[-2] + ps[-3]) / dt**2 if len(ps) >= 3 else np.zeros(3)
        j = (ps[-1] - 3 * ps[-2] + 3 * ps[-3] - ps[-4]) / dt**3 if len(ps) >= 4 else np.zeros(3)
        obj = obs[4:7]
        event = None
        if self._cmd != self._prev_cmd:
            event = "close" if self._cmd > 0 else "open"
        k = Kinematics(step=len(self.history), ee_pos=tuple(float(x) for x in p), gripper=float(obs[3]),
                       speed=float(np.linalg.norm(v)), accel=float(np.linalg.norm(a)),
                       jerk=float(np.linalg.norm(j)),
                       obj_dist=float(np.linalg.norm(p - obj)) if np.any(obj) else float("inf"),
                       gripper_cmd=float(self._cmd), gripper_event=event)
        self.history.append(k)
        if self.keep is not None and len(self.history) > self.keep:
            del self.history[0]
        self._prev_cmd = self._cmd
        return k

    def commanded(self, action) -> None:
        """Record the action the policy sent (its last entry is Meta-World's gripper command: > 0 closes).

        A command within ``GRIPPER_DEADBAND`` of 0 keeps the previous state: the learned policy's "leave the
        gripper open" is the bin nearest 0 (+0.004), which a bare sign test read as a close at every
        episode's first step (and then missed the real grasp)."""
        a = float(np.asarray(action)[-1])
        if abs(a) > GRIPPER_DEADBAND:
            self._cmd = 1.0 if a > 0 else -1.0
