"""The closed-loop Meta-World benchmark of a VLA-shaped policy (issue 10, item 6).

    .venv/bin/python -m examples.robot all      [--tasks a,b,c] [--demos 100] [--steps 3000] [--episodes 50] [--seed 0]
    .venv/bin/python -m examples.robot expert   [--tasks ...] [--episodes 50] [--seed 0]
    .venv/bin/python -m examples.robot collect  [--tasks ...] [--demos 100] [--noise 0.2]   -> out/robot/demos.npz
    .venv/bin/python -m examples.robot train    [--steps 3000]                              -> out/robot/policy/
    .venv/bin/python -m examples.robot eval     [--tasks ...] [--episodes 50] [--seed 0] [--configs fp32,static8,...]

``eval`` prints exactly one line per task and configuration on stdout::

    <task> <config> success=<rate> avg_bits=<bits> weight_bytes=<n>

and the details (plan fractions, env / policy time per step) on stderr and in
``<out>/eval.json``. Needs Meta-World (``make robot`` installs it: the
``robot`` extra of pyproject.toml).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_TASKS = "reach-v3,button-press-v3,drawer-open-v3,pick-place-v3,push-v3"


def _tasks(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def cmd_expert(a) -> None:
    from .sim import expert_success

    for task in _tasks(a.tasks):
        print(f"{task} expert success={expert_success(task, a.episodes, a.seed, a.max_steps):.2f}", flush=True)


def cmd_collect(a) -> None:
    from .sim import collect, save_demos

    t0 = time.perf_counter()
    demos = collect(_tasks(a.tasks), a.demos, noise=a.noise, max_steps=a.max_steps)
    save_demos(a.out / "demos.npz", demos)
    print(f"collected {len(demos['obs'])} samples in {time.perf_counter() - t0:.1f} s -> {a.out / 'demos.npz'}",
          file=sys.stderr)


def cmd_train(a) -> None:
    from .model import save_policy
    from .sim import load_demos
    from .train import TrainConfig, provenance, train

    made_by = provenance()
    demos = load_demos(a.out / "demos.npz")
    cfg = TrainConfig(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.train_seed)
    model, tok, stats = train(demos, cfg, {"d_model": a.d_model, "layers": a.layers, "heads": a.heads})
    meta = {"tasks": [str(t) for t in demos["tasks"]], "train": {**vars(cfg), **stats}, "provenance": made_by}
    save_policy(a.out / "policy", model, tok, meta)
    print(f"trained {stats['parameters']} parameters in {stats['train_seconds']:.0f} s "
          f"({stats['threads']} threads) -> {a.out / 'policy'}", file=sys.stderr)


def calibration_samples(path, tok, n: int = 32, seed: int = 0) -> list[tuple]:
    """``n`` demonstration steps as inputs of the forward (instruction, observation, the expert's action
    tokens): kiln measures each layer's sensitivity on them."""
    import numpy as np

    from .sim import load_demos
    from .tokens import actions_to_tokens, instruction

    demos = load_demos(path)
    rows = np.random.default_rng(seed).choice(len(demos["obs"]), size=min(n, len(demos["obs"])), replace=False)
    tasks = [str(t) for t in demos["tasks"]]
    tokens = torch.from_numpy(actions_to_tokens(demos["actions"][rows]))
    return [(tok.tensor(instruction(tasks[int(demos["task"][r])])), torch.from_numpy(demos["obs"][r]).float()[None],
             tokens[i:i + 1]) for i, r in enumerate(rows)]


def cmd_eval(a) -> None:
    from .configs import ALL_CONFIGS, BuildContext, NotAvailable, build, run_order
    from .model import load_policy
    from .sim import evaluate, make_env

    model, tok, doc = load_policy(a.out / "policy")
    tasks = _tasks(a.tasks) if a.tasks else doc["tasks"]
    configs = run_order(_tasks(a.configs) if a.configs else ALL_CONFIGS)
    trace = None
    if a.trace:
        trace = a.out / "trace.jsonl"
        trace.unlink(missing_ok=True)
    results, unavailable = [], set()
    calibration = calibration_samples(a.out / "demos.npz", tok) if (a.out / "demos.npz").exists() else []
    for task in tasks:
        env = make_env(task)
        ctx = BuildContext(task, calibration=calibration)
        for name in configs:
            if name in unavailable:
                continue
            try:
                policy = build(name, model, ctx)
            except NotAvailable as e:
                print(f"not run: {e}", file=sys.stderr)
                unavailable.add(name)
                continue
            r = evaluate(policy, tok, task, a.episodes, a.seed, a.max_steps, env=env, trace=trace)
            ctx.results[name] = r
            print(r.line(), flush=True)
            print(r.detail(), file=sys.stderr, flush=True)
            results.append(r.to_json())
    (a.out / "eval.json").write_text(json.dumps({"seed": a.seed, "episodes": a.episodes, "max_steps": a.max_steps,
                                                "threads": torch.get_num_threads(), "results": results},
                                               indent=2) + "\n")


def main(argv=None) -> None:
    from .sim import MAX_STEPS

    p = argparse.ArgumentParser(prog="python -m examples.robot", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["all", "expert", "collect", "train", "eval"])
    p.add_argument("--tasks", default=None, help=f"comma-separated Meta-World v3 tasks (default {DEFAULT_TASKS}; "
                   "eval: the policy's own)")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task and configuration")
    p.add_argument("--seed", type=int, default=0, help="first evaluation episode's seed (episodes: seed, seed+1, ...)")
    p.add_argument("--configs", default=None, help="comma-separated configurations (default: all available)")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS)
    p.add_argument("--demos", type=int, default=100, help="demonstration episodes per task")
    p.add_argument("--noise", type=float, default=0.2, help="DART action-noise std while collecting")
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1 by default)")
    p.add_argument("--trace", action="store_true", help="eval: write per-step kinematics to <out>/trace.jsonl")
    p.add_argument("--out", type=Path, default=Path("out/robot"))
    a = p.parse_args(argv)
    if a.command != "eval" and a.tasks is None:
        a.tasks = DEFAULT_TASKS
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:  # the caller's thread count back afterwards (main() called from Python, as the tests do)
        if a.command == "all":
            cmd_collect(a)
            cmd_train(a)
            cmd_eval(a)
        else:
            {"expert": cmd_expert, "collect": cmd_collect, "train": cmd_train, "eval": cmd_eval}[a.command](a)
    finally:
        torch.set_num_threads(caller_threads)


if __name__ == "__main__":
    main()
