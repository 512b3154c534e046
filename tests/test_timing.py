"""kiln.timing's arithmetic (no wall-clock assertion: the callables' times are not checked)."""
from kiln import timing
from kiln.timing import paired_speedup, rounds_ms


def test_paired_speedup_is_the_median_of_per_round_ratios_with_quartiles():
    eager = [10.0, 20.0, 12.0, 11.0, 30.0]  # drifting rounds: the per-round ratios stay put
    kiln = [5.0, 10.0, 8.0, 11.0, 10.0]
    median, q1, q3 = paired_speedup(eager, kiln)
    assert median == 2.0  # ratios 2, 2, 1.5, 1, 3
    assert q1 <= median <= q3 and (q1, q3) == (1.25, 2.5)


def test_rounds_ms_runs_each_contender_warmup_plus_repeat_times_interleaved():
    calls = []
    times = rounds_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeat=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_rounds_ms_settles_untimed_after_each_call_of_the_named_contenders(monkeypatch):
    calls = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: calls.append(f"sleep {s}"))
    times = rounds_ms({"a": lambda: calls.append("a"), "ort": lambda: calls.append("ort")}, repeat=2, warmup=1,
                      settle_s={"ort": 0.1})
    assert calls == ["a", "ort", "sleep 0.1"] + ["a", "ort", "sleep 0.1"] * 2
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "ort": 2}
