"""``python -m tests.fuzz``: a campaign of N seeded cases, or one case by its seed.

    python -m tests.fuzz -n 200 [--seed S] [--target cpu|torch] [-j JOBS] [--out out/fuzz]
    python -m tests.fuzz --case SEED [--target ...]     # the program and its outcome, in this process
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .runner import ROOT, campaign, commit, serve, write_report


def _show(record: dict) -> None:
    for key in ("outcome", "noncontiguous_inputs", "aliased_compile_inputs", "stage", "reason", "exception", "where", "eager_exception", "same_kind", "fallback",
                "err_kiln_eager", "err_eager_fp64", "err_kiln_fp64", "fp64_distance_ratio", "fp64_exception", "compile_s", "stderr_tail"):
        if record.get(key) not in (None, [], "", False):
            print(f"{key}: {record[key]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=200, help="number of cases (default 200)")
    p.add_argument("--seed", type=int, help="first case seed; cases are SEED .. SEED+N-1 (default: from the clock)")
    p.add_argument("--target", default="cpu", choices=("cpu", "torch"))
    p.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "fuzz")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a case may take before it counts as a crash")
    p.add_argument("--case", type=int, metavar="SEED", help="run one case in this process and print it")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        serve(args.target, args.result_fd)
        return 0
    if args.case is not None:
        from .generator import generate
        from .oracle import run_case

        print(generate(args.case).source(), end="\n\n", flush=True)  # first: the case may kill this process
        record = run_case(args.case, args.target)
        del record["program"]
        _show(record)
        return 0
    first = args.seed if args.seed is not None else int(time.time()) % 1_000_000 * 1000
    print(f"fuzz: {args.n} cases, seeds {first}..{first + args.n - 1}, target {args.target}, {args.jobs} job(s); "
          f"reproduce one with: python -m tests.fuzz --case SEED --target {args.target}", flush=True)

    def progress(r: dict, done: int) -> None:
        extra = f"  {r.get('exception') or r.get('reason') or ''}"[:160] if r["outcome"] != "match" else ""
        print(f"[{done}/{args.n}] seed {r['seed']} {r['outcome']} ({r.get('dtype', '?')}: "
              f"{', '.join(r.get('ops', []))}){extra}", flush=True)

    start = time.time()
    records = campaign(list(range(first, first + args.n)), args.target, args.jobs, args.out, args.timeout, progress)
    meta = {"target": args.target, "seeds": f"{first}..{first + args.n - 1}", "first_seed": first, "n": args.n,
            "command": shlex.join(["python", "-m", "tests.fuzz", *(sys.argv[1:] if argv is None else argv)]),
            "commit": commit(), "seconds": time.time() - start}
    path, table = write_report(records, args.out, meta)
    print()
    print(table)
    print(f"\nreport: {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
