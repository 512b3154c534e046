"""The scheduler's overhead per task against kiln 0.1's executor (a plain loop over partitions), and two queues.

A program of tiny tasks (a small GEMM on the ``cpu`` target, then ``frac`` on
``torch``, in two branches joined by a third GEMM: 5 tasks) runs through

- the loop kiln 0.1's executor ran (``env.update(zip(outputs, kernel(...)))``
  per partition, reproduced here over the same loaded kernels),
- the scheduler with every task on ``cpu0`` (what ``kiln.compile`` writes),
- the scheduler with one branch on ``cpu1`` (a worker thread per queue),
- the scheduler recording a trace;

and prints the median microseconds per call and per task, and the
difference to the plain loop per task. Results of every path are checked
bitwise equal first. Nothing is asserted.

    .venv/bin/python benchmarks/scheduler_overhead.py --repeat 2000
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kiln
from kiln import zoo
from kiln.timing import machine
from kiln.runtime import Artifact, CompiledModel, Trace
from kiln.runtime.artifact import place_on_queues


def _plain_loop(program):
    """kiln 0.1's CompiledModel.run over the same kernels, in the listed (scheduled) order."""
    steps = [(inputs, outputs, kernel) for _, _, inputs, outputs, kernel, _ in program._tasks]
    names = [i.name for i in program.signature.inputs]
    results = [o["value"] for o in program.entry["outputs"]]

    def run(flat):
        env = dict(zip(names, flat))
        with torch.no_grad():
            for inputs, outputs, kernel in steps:
                env.update(zip(outputs, kernel(*[env[n] for n in inputs])))
        return [env[r] for r in results]
    return run


def _median_us(fn, repeat: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    model, (x,) = zoo.branches()
    one = kiln.compile(model, (x,))
    artifact = Artifact(json.loads(json.dumps(one.manifest)), one.artifact.weights, one.artifact.files)
    tasks = artifact.manifest["programs"]["main"]["tasks"]
    gemm_b = next(t["name"] for t in tasks if "p_b_weight" in t["weights"])
    place_on_queues(artifact.manifest, {gemm_b: "cpu1", next(t["name"] for t in tasks if t["after"] == [gemm_b]): "cpu1"})
    two = CompiledModel(artifact)
    flat = [x]
    plain = _plain_loop(one.default_program)
    trace = Trace()
    paths = {
        "kiln 0.1 loop": lambda: plain(flat),
        "scheduler, 1 queue": lambda: one.run(flat),
        "scheduler, 2 queues": lambda: two.run(flat),
        "scheduler, 1 queue, traced": lambda: one.run(flat, trace=trace),
    }
    reference = plain(flat)
    for name, fn in paths.items():
        assert all(torch.equal(a, b) for a, b in zip(fn(), reference)), name
    n = len(tasks)
    print(f"machine: {machine()}")
    print(f"{n} tasks ({', '.join(t['backend'] for t in tasks)}), median of {args.repeat} calls, "
          f"torch {torch.get_num_threads()} threads")
    base = None
    for name, fn in paths.items():
        us = _median_us(fn, args.repeat)
        base = us if base is None else base
        print(f"  {name:<28} {us:9.1f} us/call  {us / n:7.1f} us/task  overhead vs loop {(us - base) / n:+6.1f} us/task")
        trace.events.clear()


if __name__ == "__main__":
    main()
