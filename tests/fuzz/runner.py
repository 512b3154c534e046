"""Cases in worker processes that may die; campaigns and their reports.

A ``Worker`` is one ``python -m tests.fuzz --worker`` process: seeds go in on
its stdin, one JSON record per case comes back on a private pipe (native code
printing to stdout cannot corrupt it). A worker that dies or hangs is killed
and restarted, and its case is a ``crash`` with the tail of its stderr.
"""
from __future__ import annotations

import collections
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .generator import generate
from .oracle import BAD, OUTCOMES

ROOT = Path(__file__).resolve().parents[2]
CASES_PER_WORKER = 150  # restart now and then: every compile loads another library


class Worker:
    def __init__(self, target: str = "cpu", timeout: float = 180.0):
        self.target, self.timeout = target, timeout
        self.proc: subprocess.Popen | None = None
        self.cases = 0

    def _start(self) -> None:
        self.log = tempfile.TemporaryFile()
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz", "--worker", "--target", self.target, "--result-fd", str(write_fd)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=self.log, stderr=self.log, pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self.results = os.fdopen(read_fd)
        self.cases = 0

    def run(self, seed: int) -> dict:
        if self.proc is None or self.proc.poll() is not None or self.cases >= CASES_PER_WORKER:
            self.close()
            self._start()
        self.cases += 1
        log_start = self.log.seek(0, os.SEEK_END)
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.results], [], [], self.timeout)
        line = self.results.readline() if ready else ""
        if line:
            return json.loads(line)
        self.log.seek(log_start)
        tail = self.log.read().decode(errors="replace").strip().splitlines()[-15:]
        rc = self.close()
        if not ready:
            what = f"worker hung: no result after {self.timeout:.0f} s (killed)"
        else:
            what = f"worker died: {signal.Signals(-rc).name}" if rc < 0 else f"worker died: exit status {rc}"
        case = generate(seed)
        return {"seed": seed, "target": self.target, "dtype": case.dtype, "ops": sorted(set(case.families)),
                "program": case.source(), "outcome": "crash", "exception": what, "stderr_tail": "\n".join(tail)}

    def close(self) -> int | None:
        """Stop the worker (killed if it does not end when its stdin closes); its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc, self.proc = self.proc.returncode, None
        self.results.close()
        self.log.close()
        return rc


def serve(target: str, result_fd: int) -> None:
    """The worker's loop: a seed per stdin line, a JSON record per case on ``result_fd``."""
    from .oracle import run_case

    results = os.fdopen(result_fd, "w")
    for line in sys.stdin:
        results.write(json.dumps(run_case(int(line), target)) + "\n")
        results.flush()


def campaign(seeds: list[int], target: str, jobs: int, out_dir: Path, timeout: float, on_result=None) -> list[dict]:
    """Run every seed on ``jobs`` workers; records stream to ``out_dir/results.jsonl``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = collections.deque(seeds)
    records: list[dict] = []
    lock = threading.Lock()
    stream = open(out_dir / "results.jsonl", "w")

    def work():
        worker = Worker(target, timeout)
        try:
            while True:
                with lock:
                    if not pending:
                        return
                    seed = pending.popleft()
                record = worker.run(seed)
                with lock:
                    records.append(record)
                    stream.write(json.dumps(record) + "\n")
                    stream.flush()
                    if on_result:
                        on_result(record, len(records))
        finally:
            worker.close()

    threads = [threading.Thread(target=work) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stream.close()
    return sorted(records, key=lambda r: r["seed"])


# -- reports ---------------------------------------------------------------------------------------
def signature(r: dict) -> str:
    """A failure class key: outcome + exception with numbers and names blurred, or the ops of a wrong case."""
    if r["outcome"] in ("wrong", "mismatch"):
        return f"{r['outcome']}: {r.get('reason', '')[:40]} [{r['dtype']}] {' '.join(r['ops'])}"
    text = re.sub(r"\d+", "N", (r.get("exception") or "")[:120])
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    return f"{r['outcome']}: {text}"


def _table(rows: dict[str, collections.Counter]) -> list[str]:
    lines = ["| | cases | " + " | ".join(OUTCOMES) + " | matched |", "|---|---|" + "---|" * len(OUTCOMES) + "---|"]
    for key, counts in rows.items():
        n = sum(counts.values())
        lines.append(f"| {key} | {n} | " + " | ".join(str(counts[o] or "") for o in OUTCOMES)
                     + f" | {100 * counts['match'] / n:.0f}% |")
    return lines


def _badness(item: tuple[str, collections.Counter]):
    """Sort key: the largest share of bad outcomes first, then of refusals."""
    name, counts = item
    n = sum(counts.values())
    return -sum(counts[o] for o in BAD) / n, -counts["refused"] / n, name


def summarize(records: list[dict]) -> dict:
    overall = collections.Counter(r["outcome"] for r in records)
    by_dtype: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in records:
        by_dtype[r.get("dtype", "?")][r["outcome"]] += 1
        for op in r.get("ops", ["?"]):
            by_op[op][r["outcome"]] += 1
    n = len(records) or 1
    runs = n - overall["eager_error"] or 1
    classes: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        if r["outcome"] not in ("match", "eager_error") or r["outcome"] == "eager_error" and not r.get("same_kind"):
            classes[signature(r)].append(r)
    return {
        "cases": len(records), "overall": dict(overall),
        "matched_pct": round(100 * overall["match"] / n, 1),
        "matched_of_eager_runs_pct": round(100 * overall["match"] / runs, 1),
        "ok_pct": round(100 * (overall["match"] + overall["eager_error"]) / n, 1),
        "matched_with_fallback": sum(1 for r in records if r["outcome"] == "match" and r.get("fallback")),
        "fallback_ops": dict(collections.Counter(op for r in records for op in set(r.get("fallback") or ()))
                             .most_common()),
        "by_dtype": {k: dict(v) for k, v in sorted(by_dtype.items())},
        "by_op": {k: dict(v) for k, v in sorted(by_op.items())},
        "classes": {k: [r["seed"] for r in sorted(v, key=lambda r: len(r.get("program", "")))]
                    for k, v in sorted(classes.items(), key=lambda kv: -len(kv[1]))},
    }


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def write_report(records: list[dict], out_dir: Path, meta: dict) -> tuple[Path, str]:
    """``report.json`` (summary + every record) and ``report.md``; returns the json path and the printed table."""
    summary = summarize(records)
    (out_dir / "report.json").write_text(json.dumps({**meta, "summary": summary, "records": records}, indent=1))
    o = summary["overall"]
    head = [f"# kiln fuzz report: {summary['cases']} cases, target {meta['target']}, seeds {meta['seeds']}",
            "", f"command: `{meta['command']}` · kiln commit {meta.get('commit', '?')} · {meta.get('seconds', 0):.0f} s",
            "", "| outcome | cases | % |", "|---|---|---|"]
    head += [f"| {k} | {o.get(k, 0)} | {100 * o.get(k, 0) / max(1, summary['cases']):.1f}% |" for k in OUTCOMES]
    head += ["", f"matched: {summary['matched_pct']}% of all cases, {summary['matched_of_eager_runs_pct']}% of the "
             f"cases eager runs; matched or correctly raising: {summary['ok_pct']}%; matched through a torch fallback: "
             f"{summary['matched_with_fallback']}", ""]
    by_dtype = {k: collections.Counter(v) for k, v in summary["by_dtype"].items()}
    by_op = dict(sorted(((k, collections.Counter(v)) for k, v in summary["by_op"].items()), key=_badness))
    text = head + ["## By dtype", ""] + _table(by_dtype) + ["", "## By op (worst first)", ""] + _table(by_op)
    text += ["", "## Ops the target placed on torch (cases)", "",
             ", ".join(f"{op} {n}" for op, n in summary["fallback_ops"].items()) or "(none)"]
    text += ["", "## Failure classes (seeds, smallest program first)", ""]
    text += [f"- {k} ({len(seeds)}): {', '.join(map(str, seeds[:8]))}" for k, seeds in summary["classes"].items()]
    text += ["", "## Cases that did not match", ""]
    for r in records:
        if r["outcome"] in ("match", "eager_error") and (r["outcome"] == "match" or r.get("same_kind")):
            continue
        text += [f"### seed {r['seed']}: {r['outcome']}" + (f" ({r.get('stage')})" if r.get("stage") else ""), ""]
        if r.get("exception"):
            text.append(f"exception: `{r['exception']}`" + (f" at {r['where']}" if r.get("where") else ""))
        if r.get("eager_exception"):
            text.append(f"eager: `{r['eager_exception']}`")
        if r["outcome"] in ("wrong", "mismatch"):
            text.append(f"{r.get('reason', '')}: max error kiln vs eager {_fmt_err(r.get('err_kiln_eager'))}, "
                        f"eager vs fp64 {_fmt_err(r.get('err_eager_fp64'))}, "
                        f"kiln vs fp64 {_fmt_err(r.get('err_kiln_fp64'))}"
                        + (f" (kiln {r['fp64_distance_ratio']}x eager's distance from fp64, in tolerances)"
                           if r.get("fp64_distance_ratio") else ""))
        if r.get("fallback"):
            text.append(f"fell back to torch: {', '.join(r['fallback'])}")
        if r.get("stderr_tail"):
            text += ["", "```", r["stderr_tail"], "```"]
        text += ["", "```python", r.get("program", "(program not returned)"), "```", ""]
    (out_dir / "report.md").write_text("\n".join(text) + "\n")
    return out_dir / "report.json", "\n".join(head + ["## By dtype", ""] + _table(by_dtype))


def commit() -> str:
    """HEAD, with ``+dirty`` when kiln/ has uncommitted changes (the run tested the working tree)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
    except OSError:
        return "?"
    return head + ("+dirty" if git("status", "--porcelain", "--", "kiln") else "") if head else "?"
