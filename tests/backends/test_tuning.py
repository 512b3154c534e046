"""Optional MetaSchedule tuning on the cpu target: tuned output matches eager, the database travels in the
artifact (hashed), a later compile reuses it without tuning, and bad options are clear kiln errors.

Tuning budgets are a handful of trials on a small MLP: the point is the plumbing, not the speed-up
(README "Tuning" has a measured example). The module fixture tunes once; the other tests reuse it.
"""
from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from torch import nn

import kiln
from kiln.api import Compilation, CompileOptions
from kiln.backends.cpu import CpuOptions
from kiln.backends.cpu.tuning import RECORD_FILE, WORKLOAD_FILE, database_file_names, read_tuning_databases
from kiln.cli import main
from kiln.errors import ArtifactError, TuningError
from kiln.runtime import read_artifact

TRIALS = 6
PART = "part0_cpu"


class NormMLP(nn.Module):
    """Three TIR kernels stay after GEMM dispatch: layer norm, gelu (+bias), softmax."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(self.norm(x)))).softmax(-1)


def make_model():
    torch.manual_seed(0)
    return NormMLP().eval(), (torch.randn(8, 64),)


def cpu(**options) -> CompileOptions:
    """Compile options with these ``CpuOptions`` for the cpu backend."""
    return CompileOptions(backend_options={"cpu": CpuOptions(**options)})


def compile_with(options: CompileOptions) -> Compilation:
    model, inputs = make_model()
    compilation = Compilation("cpu", options=options)
    compilation.trace(model, inputs)
    compilation.optimize()
    compilation.compiled = compilation.lower()
    return compilation


def _refuse(*args, **kwargs):
    raise AssertionError("the tuning path pickled or forked a worker")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuning run, with pickle and TVM's process pool (cloudpickle) made to fail if touched."""
    from tvm.support import popen_pool

    with pytest.MonkeyPatch.context() as mp:
        for name in ("dump", "dumps", "load", "loads"):
            mp.setattr(pickle, name, _refuse)
        mp.setattr(popen_pool.PopenWorker, "__init__", _refuse)
        mp.setattr(popen_pool.PopenPoolExecutor, "__init__", _refuse)
        compilation = compile_with(cpu(tune_trials=TRIALS))
    path = compilation.compiled.save(tmp_path_factory.mktemp("tuned") / "artifact")
    return compilation, path


def _report(compiled) -> dict:
    return compiled.manifest["partitions"][0]["report"]


def test_tuned_model_matches_eager_and_reports_the_trials(tuned):
    compilation, _ = tuned
    model, inputs = make_model()
    torch.testing.assert_close(compilation.compiled(*inputs), model(*inputs))
    report = _report(compilation.compiled)
    tuning = report["tuning"]
    assert tuning["trials_run"] <= TRIALS and tuning["trials_run"] > 0
    assert tuning["tasks"] == 3 and tuning["from_database"] == 0
    assert tuning["tuned"] >= 1 and tuning["applied"] >= tuning["tuned"]
    schedules = {k["name"]: k["schedule"] for k in report["kernels"]}
    assert sum(bool(k.get("tuning_database")) for k in report["kernels"]) == tuning["applied"]
    # kiln's rule competes with the candidates; where it measured faster, its record is applied.
    assert sum(s == "meta_schedule" for s in schedules.values()) == tuning["applied"] - tuning["kept_rule"]
    # What tuning did not cover, kiln's rules scheduled.
    assert all(s == "meta_schedule" or s.startswith(("kiln.", "dlight.")) for s in schedules.values())
    assert "tune" in report["stage_seconds"]


def test_artifact_holds_the_database_hashed_and_runs_without_it(tuned, fresh_python):
    _, path = tuned
    workloads, records = database_file_names(PART)
    entry = read_artifact(path).manifest["partitions"][0]  # verifies every file's sha256
    assert entry["files"] == [f"{PART}.so"]  # the kernel loader's files: the library only
    assert entry["compiler_files"] == sorted([workloads, records])
    manifest = read_artifact(path).manifest
    assert {workloads, records} <= set(manifest["files"])
    assert b"{" in (path / records).read_bytes()
    # Loading and running needs neither the compiler nor the database (and never unpickles).
    out = fresh_python(f"""
        import kiln, torch
        cm = kiln.load({str(path)!r})
        print(tuple(cm(torch.randn(8, 64)).shape))
    """)
    assert out.strip() == "(8, 64)"


def test_reusing_the_artifact_applies_its_records_without_tuning(tuned):
    first, path = tuned
    again = compile_with(cpu(tuning_database=str(path)))
    tuning = _report(again.compiled)["tuning"]
    applied = _report(first.compiled)["tuning"]["applied"]
    assert tuning["trials_run"] == 0 and tuning["tuned"] == 0
    assert tuning["from_database"] == applied and tuning["applied"] == applied
    assert _report(again.compiled)["kernels"] == _report(first.compiled)["kernels"]
    assert again.lowered[PART].details["tir"] == first.lowered[PART].details["tir"]  # the same schedules
    model, inputs = make_model()
    torch.testing.assert_close(again.compiled(*inputs), model(*inputs))


def test_a_metaschedule_database_directory_is_reused_too(tuned, tmp_path):
    first, path = tuned
    workloads, records = database_file_names(PART)
    shutil.copy(path / workloads, tmp_path / WORKLOAD_FILE)
    shutil.copy(path / records, tmp_path / RECORD_FILE)
    again = compile_with(cpu(tuning_database=tmp_path))
    assert _report(again.compiled)["tuning"]["applied"] == _report(first.compiled)["tuning"]["applied"]
    assert again.lowered[PART].details["tir"] == first.lowered[PART].details["tir"]


def test_a_tampered_database_in_an_artifact_is_refused(tuned, tmp_path):
    _, path = tuned
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    records = copy / database_file_names(PART)[1]
    records.write_bytes(records.read_bytes().replace(b"[", b"[ ", 1))
    with pytest.raises(ArtifactError, match=database_file_names(PART)[1]):
        read_tuning_databases(copy)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8", None])
def test_bad_tune_trials_is_a_clear_error(bad):
    with pytest.raises(TuningError, match=r"CpuOptions\.tune_trials .* not " + repr(bad).replace(".", r"\.")):
        CpuOptions(tune_trials=bad)


def test_missing_or_wrong_tuning_database_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TuningError, match=r"CpuOptions\.tuning_database: .*nope.* does not exist"):
        CpuOptions(tuning_database=str(missing))
    with pytest.raises(TuningError, match="neither a kiln artifact .* nor a MetaSchedule database"):
        read_tuning_databases(tmp_path)
    (tmp_path / WORKLOAD_FILE).write_text("not json\n")
    (tmp_path / RECORD_FILE).write_text("not json\n")
    with pytest.raises(TuningError, match="not a readable MetaSchedule JSON database"):
        compile_with(cpu(tuning_database=tmp_path))


FACTORY = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        return torch.softmax(self.proj(self.norm(x)), dim=-1)


def small():
    torch.manual_seed(0)
    return Small().eval(), (torch.randn(4, 32),)
'''


def test_cli_compile_tune_and_inspect_show_the_tuned_kernels(tmp_path, capsys):
    factory = tmp_path / "models.py"
    factory.write_text(FACTORY)
    out_dir = tmp_path / "out"
    assert main(["compile", f"{factory}:small", "-o", str(out_dir), "--tune", "3"]) == 0
    printed = capsys.readouterr().out
    assert "tuning" in printed and "trials run" in printed
    entry = kiln.load(out_dir).manifest["partitions"][0]
    assert entry["compiler_files"] and 0 < entry["report"]["tuning"]["trials_run"] <= 3

    assert main(["inspect", f"{factory}:small", "--tuning-db", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    # Each kernel's schedule: MetaSchedule's, or kiln's rule where it measured faster (both from the database).
    applied = entry["report"]["tuning"]["applied"]
    assert f"{applied} scheduled from the tuning database" in printed
    assert printed.count(", from the tuning database]") == applied
    assert "trials_run: 0" in printed

    with pytest.raises(SystemExit) as exit_info:
        main(["compile", f"{factory}:small", "-o", str(out_dir), "--tune", "-2"])
    assert exit_info.value.code == 2
    assert "must be at least 0" in capsys.readouterr().err
    assert main(["compile", f"{factory}:small", "-o", str(out_dir), "--tuning-db", str(tmp_path / "none")]) == 1
    assert "tuning_database" in capsys.readouterr().err


@pytest.mark.slow
def test_tuning_a_transformer_block_stays_within_tolerance():
    """A real budget (64 trials) over a one-layer llama's TIR kernels (RMS norm, RoPE, silu*up)."""
    from kiln import zoo

    model, inputs = zoo.llama(layers=1)
    cm = kiln.compile(model, inputs, options=cpu(tune_trials=64))
    with torch.no_grad():
        want = model(*inputs)
    torch.testing.assert_close(cm(*inputs).logits, want.logits)
    assert _report(cm)["tuning"]["trials_run"] <= 64
