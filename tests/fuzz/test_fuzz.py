"""A fixed-seed subset of the differential fuzzer: no wrong result, foreign exception or crash.

Each seed is one generated program (``python -m tests.fuzz --case SEED`` prints it
and its outcome), run in a worker process that may die. ``refused`` (a
KilnError), ``eager_error`` (eager and kiln both raise) and ``mismatch`` (kiln
off, but eager too is off from fp64: an ill-conditioned program, no verdict)
pass; ``wrong``, ``foreign`` and ``crash`` fail.

``EXPECTED_FAILURES`` is the known-failure table (as Inductor's OpInfo
xfails): a listed seed must still fail, so a fix turns the table red too
("unexpected success") and the entry is then removed.
"""
from __future__ import annotations

import pytest

from .oracle import FAILING
from .runner import Worker

# Seeds from campaigns (tests/fuzz/FINDINGS.md) whose programs found a bug, kept once it is fixed.
REGRESSION_SEEDS = {
    1000025: "bf16 NaN from rsqrt compared (fixed)",
    1000172: "clamp with a tensor bound dropped NaN (fixed)",
    1000230: "Linear on an empty input: Mismatched lv.strides (fixed)",
    1000279: "bf16 pow of a negative, then compared (fixed)",
    3000133: "F2: bf16 Linear on oneDNN, NaN bleeds into the previous row (only when oneDNN is measured faster)",
    3000208: "F3: chained clamp, exponential compile time (a hang)",
    6000423: "F5: elu near 0 as exp(x) - 1, then a reciprocal",
    9100138: "F6: layer norm's mean summed in fp32, then a sum of the normalized row (fixed: fp64 mean)",
    9701127: "F6: layer norm's mean summed in fp32, then its reciprocal (fixed: fp64 mean)",
    9800272: "F7: attention on the library dropped NaN from rows of contiguous inputs (fixed: eager's layout)",
    9980011: "F10: attention's math path on non-finite inputs gave NaN where eager's fused kernel gives 0 (fixed: "
             "eager's layout)",
    243: "F8: one tensor given for two example inputs, traced as one placeholder (fixed: traced on copies); 83 too",
}
SEEDS = [*range(200), *REGRESSION_SEEDS]
CASE_TIMEOUT_S = 60  # a case that compiles this long is a failure (crash: hung) in the subset

# seed -> why it fails today (a kiln bug with its FINDINGS.md class, or a reason the case cannot pass).
EXPECTED_FAILURES: dict[int, str] = {}


def verdict(record: dict, expected: str | None) -> str | None:
    """What is wrong with ``record`` given the table entry ``expected`` (None: nothing)."""
    failed = record["outcome"] in FAILING
    if expected is not None:
        return None if failed else (f"unexpected success: seed {record['seed']} is {record['outcome']} now; "
                                    f"remove it from EXPECTED_FAILURES ({expected})")
    if not failed:
        return None
    details = [f"{k}: {record[k]}" for k in ("reason", "exception", "where", "eager_exception", "err_kiln_eager",
                                            "err_eager_fp64", "fallback", "stderr_tail") if record.get(k)]
    return "\n".join([f"seed {record['seed']}: {record['outcome']}", *details, record.get("program", "")])


@pytest.fixture(scope="module")
def worker():
    w = Worker("cpu", timeout=CASE_TIMEOUT_S)
    yield w
    w.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_case(worker, seed):
    problem = verdict(worker.run(seed), EXPECTED_FAILURES.get(seed))
    if problem:
        pytest.fail(problem, pytrace=False)


def test_expected_failure_table_semantics():
    wrong, match = {"seed": 1, "outcome": "wrong"}, {"seed": 1, "outcome": "match"}
    assert verdict(match, None) is None and verdict({"seed": 1, "outcome": "refused"}, None) is None
    assert "seed 1: wrong" in verdict(wrong, None)
    assert verdict(wrong, "known bug") is None
    assert "unexpected success" in verdict(match, "known bug")
