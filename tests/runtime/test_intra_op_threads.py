"""CompileOptions.intra_op_threads: a program's calls run with a fixed (or measured) PyTorch thread count."""
import pytest
import torch
from torch import nn

import kiln
from kiln.errors import KilnError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(3, 16)


def _spy(cm):
    seen = []
    program = cm.default_program
    tasks = program._tasks

    def record(kernel):
        def run(*args):
            seen.append(torch.get_num_threads())
            return kernel(*args)
        return run

    program._tasks = [(n, q, i, o, record(k), a) for n, q, i, o, k, a in tasks]
    return seen


def test_a_fixed_count_runs_every_call_with_it_restores_the_callers_and_survives_a_save(tmp_path):
    m, x = _model()
    cm = kiln.compile(m, (x,), options=kiln.CompileOptions(intra_op_threads=1))
    assert cm.manifest["programs"]["main"]["intra_op_threads"] == 1
    before = torch.get_num_threads()
    seen = _spy(cm)
    torch.testing.assert_close(cm(x), m(x))
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
    loaded = kiln.load(cm.save(tmp_path / "a"))
    assert loaded.manifest["programs"]["main"]["intra_op_threads"] == 1
    seen = _spy(loaded)
    loaded(x)
    assert set(seen) == {1}


def test_measure_records_both_times_and_keeps_the_faster():
    m, x = _model()
    cm = kiln.compile(m, (x,), options=kiln.CompileOptions(intra_op_threads="measure"))
    entry = cm.manifest["programs"]["main"]
    full = torch.get_num_threads()
    if full == 1:
        assert entry["intra_op_threads"] == 1
        return
    ms = entry["intra_op_threads_measured_ms"]
    assert set(ms) == {"1", str(full)} and all(v > 0 for v in ms.values())
    want = 1 if ms["1"] < 0.95 * ms[str(full)] else full
    assert entry["intra_op_threads"] == want
    torch.testing.assert_close(cm(x), m(x))


def test_without_the_option_nothing_is_set_and_bad_values_are_refused():
    m, x = _model()
    cm = kiln.compile(m, (x,))
    assert "intra_op_threads" not in cm.manifest["programs"]["main"]
    for bad in (0, -1, "fast", 1.5, True):
        with pytest.raises(KilnError, match="intra_op_threads"):
            kiln.CompileOptions(intra_op_threads=bad)


def test_auto_measures_only_a_quantized_compile():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))  # nested quantization: K % 128 == 0
    x = torch.randn(1, 128)
    q = kiln.NestedQuantization(plans={"w4": {"default": 4}})
    cm = kiln.compile(m, (x,), options=kiln.CompileOptions(quantization=q, calibration=[(x,)]))
    for entry in cm.manifest["programs"].values():
        assert "intra_op_threads" in entry
        if torch.get_num_threads() > 1:
            assert "intra_op_threads_measured_ms" in entry
    plain = kiln.compile(m, (x,), options=kiln.CompileOptions(intra_op_threads="auto"))
    assert "intra_op_threads" not in plain.manifest["programs"]["main"]
