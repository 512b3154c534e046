"""Tune DyQ on tuning seeds: each variant's DyQ run, then the static plan kiln allocates at its measured bits.

    .venv/bin/python -m examples.robot.tune_dyq --tasks push-v3 --seed 1000 --episodes 20 [--refs fp32,static2] \\
        [--budgets 2.15,2.3] [VARIANT ...]

A VARIANT is a name of ``VARIANTS`` or JSON ``[[plan, ...], {DyQParams field: value}]`` over the plans of one
artifact (``PLANS``: w8 / w4 / w2, and per-layer budgets hi45 4.5, mid30 3.0, b245 2.45, b23 2.3 bits). Prints
one line per variant: DyQ's success, average bits and plan fractions, then ``static-matched`` at those bits
(as the harness builds it). ``--budgets``: static plans at these budgets alone. Use seeds that are not the
evaluation's (``eval`` runs 0..49). One torch thread.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PLANS = {"w8": {"default": 8}, "w4": {"default": 4}, "w2": {"default": 2},
         "hi45": 4.5, "mid30": 3.0, "b245": 2.45, "b23": 2.3}
_EVENTS = {"slow_weight": 0.0, "accel_weight": 0.0, "jerk_weight": 0.0, "proximity_weight": 0.0,
           "thresholds": (0.5,), "dwell": 2, "event_hold": 10}
VARIANTS = {
    "default": (["hi45", "mid30", "w2"], {}),                    # configs.DYQ_PLANS with the default DyQParams
    "grasp-w8": (["w8", "w2"], _EVENTS),                         # 8 bits for 10 steps from each gripper event
    "grasp-w4": (["w4", "w2"], _EVENTS),
    "grasp-hi45": (["hi45", "w2"], _EVENTS),
    "grasp-mid30": (["mid30", "w2"], _EVENTS),
    "grasp-b245": (["b245", "w2"], _EVENTS),
    "grasp-b23": (["b23", "w2"], _EVENTS),
}


def variant(spec: str):
    if spec in VARIANTS:
        return VARIANTS[spec]
    plans, kw = json.loads(spec)
    if "thresholds" in kw:
        kw["thresholds"] = tuple(kw["thresholds"])
    return plans, kw


def main(argv=None) -> None:
    from kiln.runtime.precision import DyQParams, DyQPolicy

    from . import configs as C
    from .__main__ import calibration_samples
    from .model import load_policy
    from .sim import evaluate, make_env

    p = argparse.ArgumentParser(prog="python -m examples.robot.tune_dyq", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="push-v3")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--refs", default="", help="configurations of the harness to run first (fp32,static2,...)")
    p.add_argument("--budgets", default="", help="static plans at these average-bit budgets")
    p.add_argument("--no-matched", action="store_true")
    p.add_argument("--out", type=Path, default=Path("out/robot"))
    p.add_argument("variants", nargs="*")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, _ = load_policy(a.out / "policy")
    cal = calibration_samples(a.out / "demos.npz", tok)
    for task in [t for t in a.tasks.split(",") if t]:
        env = make_env(task)
        ctx = C.BuildContext(task, calibration=cal)
        cm = C.kiln_artifact(model, PLANS, ctx)
        for r in [x for x in a.refs.split(",") if x]:
            res = evaluate(C.build(r, model, ctx), tok, task, a.episodes, a.seed, env=env)
            print(f"{task} {r} success={res.success:.2f} avg_bits={res.avg_bits:.2f}", flush=True)
        for b in [float(x) for x in a.budgets.split(",") if x]:
            cmb = C.kiln_artifact(model, {"m": b}, ctx)
            res = evaluate(C.StaticPolicy("m", C.kiln_step(cmb, "m"), C.kiln_plan(cmb, "m"), 0), tok, task,
                           a.episodes, a.seed, env=env)
            print(f"{task} static@{b} success={res.success:.2f} avg_bits={res.avg_bits:.2f} "
                  f"{cmb.manifest['quantization']['plans']['m']['bits']}", flush=True)
        for spec in a.variants:
            plans, kw = variant(spec)
            pl = {n: C.kiln_plan(cm, n) for n in plans}
            sel = DyQPolicy({n: q.avg_bits for n, q in pl.items()}, DyQParams(**kw))
            pol = C.SwitchingPolicy("dyq", {n: C.kiln_step(cm, n) for n in plans}, pl, sel,
                                    C.kiln_weight_bytes(model, cm, plans))
            t = time.perf_counter()
            res = evaluate(pol, tok, task, a.episodes, a.seed, env=env)
            fr = " ".join(f"{k}:{v / res.steps:.2f}" for k, v in sorted(res.plans.items()))
            line = (f"{task} {spec} dyq success={res.success:.2f} avg_bits={res.avg_bits:.2f} [{fr}] "
                    f"switches={sel.stats.switches} weight_bytes={pol.weight_bytes}")
            if not a.no_matched:
                ctx.results["dyq"] = res
                m = evaluate(C.build("static-matched", model, ctx), tok, task, a.episodes, a.seed, env=env)
                line += f" | static-matched success={m.success:.2f} avg_bits={m.avg_bits:.2f}"
            print(f"{line} ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
