"""Meta-World v3: environments, expert demonstrations (with DART noise) and the closed-loop evaluation.

Environments are Meta-World's v3 classes with the goal observable and a fresh
random layout (object / goal positions) drawn from ``env.seed(seed)`` at every
reset, so a seed names one episode exactly (MT1's wrapper cycles 50 frozen
layouts and ignores ``reset(seed=)``). Demonstrations use seeds from
``COLLECT_SEED`` on; evaluation uses ``seed, seed + 1, ...``: held-out layouts,
the same for every configuration.

Meta-World is imported inside the functions: the rest of the example, and
its tests, do not need it.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .configs import RobotPolicy
from .kinematics import KinematicSignals
from .model import greedy_decode
from .tokens import InstructionTokenizer, instruction, tokens_to_actions

COLLECT_SEED = 1_000_000
MAX_STEPS = 200     # the experts finish these tasks in 40-130 steps; Meta-World's own limit is 500


def make_env(task: str):
    """One Meta-World v3 environment of ``task`` (e.g. ``pick-place-v3``), goal observable, layouts seeded."""
    import warnings

    warnings.filterwarnings("ignore", module="gymnasium")
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    if task not in ALL_V3_ENVIRONMENTS:
        raise SystemExit(f"unknown Meta-World v3 task {task!r}; known: {', '.join(ALL_V3_ENVIRONMENTS)}")
    env = ALL_V3_ENVIRONMENTS[task]()
    env._partially_observable = False
    env.__dict__.pop("sawyer_observation_space", None)   # a cached property computed for the hidden goal
    env._set_task_called = True
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    return env


def reset(env, seed: int) -> np.ndarray:
    env.seed(seed)
    obs, _ = env.reset()
    return obs


def expert(task: str):
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


# ---------------------------------------------------------------- demonstrations

def collect(tasks: list[str], demos: int, noise: float = 0.2, clean_frac: float = 0.25, extra: int = 10,
            max_steps: int = MAX_STEPS, seed: int = COLLECT_SEED, log=sys.stderr) -> dict[str, np.ndarray]:
    """Expert demonstrations: ``demos`` episodes per task. DART-style noise: in all but ``clean_frac`` of
    the episodes the *executed* action is the expert's plus Gaussian noise of std ``noise`` (uniform in
    [0.5, 1] x ``noise`` per episode), while the *label* stays the expert's clean action -- the data then
    covers the states a slightly wrong learner drifts into, with the expert's correction. An episode
    runs to ``extra`` steps past the first success (or ``max_steps``)."""
    rng = np.random.default_rng(seed)
    obs_l, act_l, task_l, ep_l = [], [], [], []
    for ti, task in enumerate(tasks):
        env, pol = make_env(task), expert(task)
        ok = 0
        for i in range(demos):
            sigma = 0.0 if i < round(clean_frac * demos) else noise * rng.uniform(0.5, 1.0)
            obs = reset(env, seed + i)
            left = None
            for _ in range(max_steps):
                a = np.clip(pol.get_action(obs), -1, 1).astype(np.float32)
                obs_l.append(obs.astype(np.float32))
                act_l.append(a)
                task_l.append(ti)
                ep_l.append(ti * demos + i)
                executed = np.clip(a + rng.normal(0, sigma, 4), -1, 1) if sigma else a
                obs, _, _, _, info = env.step(executed)
                if left is None and info["success"]:
                    ok += 1
                    left = extra
                if left is not None:
                    left -= 1
                    if left <= 0:
                        break
        print(f"collect {task}: {demos} episodes, {ok} reached success, "
              f"{sum(1 for t in task_l if t == ti)} samples", file=log, flush=True)
    return {"obs": np.stack(obs_l), "actions": np.stack(act_l), "task": np.array(task_l, dtype=np.int64),
            "episode": np.array(ep_l, dtype=np.int64), "tasks": np.array(tasks)}


def save_demos(path: str | Path, demos: dict[str, np.ndarray]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **demos)


def load_demos(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def expert_success(task: str, episodes: int, seed: int, max_steps: int = MAX_STEPS) -> float:
    env, pol = make_env(task), expert(task)
    ok = 0
    for ep in range(episodes):
        obs = reset(env, seed + ep)
        for _ in range(max_steps):
            obs, _, _, _, info = env.step(np.clip(pol.get_action(obs), -1, 1))
            if info["success"]:
                ok += 1
                break
    return ok / episodes


# ---------------------------------------------------------------- closed loop

@dataclass
class EvalResult:
    task: str
    config: str
    episodes: int
    successes: int
    weight_bytes: int
    steps: int = 0
    bits_sum: float = 0.0
    plans: Counter = field(default_factory=Counter)
    env_s: float = 0.0
    policy_s: float = 0.0

    @property
    def success(self) -> float:
        return self.successes / self.episodes

    @property
    def avg_bits(self) -> float:
        return self.bits_sum / max(self.steps, 1)

    def line(self) -> str:
        """The benchmark's one line per task and configuration."""
        return (f"{self.task} {self.config} success={self.success:.2f} avg_bits={self.avg_bits:.2f} "
                f"weight_bytes={self.weight_bytes}")

    def detail(self) -> str:
        fr = " ".join(f"{k}:{v / max(self.steps, 1):.3f}" for k, v in sorted(self.plans.items()))
        return (f"  {self.task} {self.config}: {self.successes}/{self.episodes} episodes, {self.steps} steps, "
                f"plan fractions {fr}; per step env {1e3 * self.env_s / max(self.steps, 1):.2f} ms, "
                f"policy {1e3 * self.policy_s / max(self.steps, 1):.2f} ms")

    def to_json(self) -> dict:
        return {"task": self.task, "config": self.config, "episodes": self.episodes, "successes": self.successes,
                "success": self.success, "avg_bits": self.avg_bits, "weight_bytes": self.weight_bytes,
                "steps": self.steps, "plan_fractions": {k: v / max(self.steps, 1) for k, v in self.plans.items()},
                "env_ms_per_step": 1e3 * self.env_s / max(self.steps, 1),
                "policy_ms_per_step": 1e3 * self.policy_s / max(self.steps, 1)}


def evaluate(policy: RobotPolicy, tokenizer: InstructionTokenizer, task: str, episodes: int, seed: int,
             max_steps: int = MAX_STEPS, env=None, trace: Path | None = None) -> EvalResult:
    """Closed-loop episodes ``seed .. seed + episodes - 1`` of ``task``; success = ``info['success']`` at any
    step within ``max_steps``. With ``trace``, one JSON line per step (kinematics, plan, action, success)
    is appended there -- the material for tuning a kinematic precision policy offline."""
    env = env or make_env(task)
    text_ids = tokenizer.tensor(instruction(task))
    res = EvalResult(task, policy.name, episodes, 0, policy.weight_bytes)
    signals = KinematicSignals()
    out = trace.open("a") if trace else None
    for ep in range(episodes):
        obs = reset(env, seed + ep)
        signals.reset()
        policy.reset()
        for _ in range(max_steps):
            t0 = time.perf_counter()
            k = signals.update(obs)
            plan = policy.select(signals)
            tokens = greedy_decode(policy.step_fn(plan), text_ids, torch.from_numpy(obs).float()[None])
            action = tokens_to_actions(tokens[0].numpy())
            signals.commanded(action)
            t1 = time.perf_counter()
            obs, _, _, _, info = env.step(action)
            t2 = time.perf_counter()
            res.policy_s += t1 - t0
            res.env_s += t2 - t1
            res.steps += 1
            res.bits_sum += plan.avg_bits
            res.plans[plan.name] += 1
            done = bool(info["success"])
            if out:
                out.write(json.dumps({"task": task, "config": policy.name, "episode": seed + ep, **k.to_json(),
                                      "plan": plan.name, "action": action.tolist(), "success": done}) + "\n")
            if done:
                res.successes += 1
                break
    if out:
        out.close()
    return res
