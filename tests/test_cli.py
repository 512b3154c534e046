"""The ``kiln`` command line: compile / run / inspect, dumps, and how every user error is reported.

The models come from a factory file written here, so nothing depends on
transformers. Commands run in-process through ``kiln.cli.main`` except one
``kiln run`` in a fresh interpreter, which proves the runtime side works alone.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from kiln.cli import load_factory, main
from kiln.errors import FactoryError
from kiln.passes import PIPELINES, STAGES, get_pipeline

FACTORIES = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class NormSoftmax(nn.Module):
    """Layer norm and softmax, with a scale computed from a buffer (fold_constants folds it)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("temperature", torch.tensor(4.0))

    def forward(self, x):
        scores = self.proj(self.norm(x)) / self.temperature.sqrt()
        return {"probs": torch.softmax(scores, dim=-1), "scores": scores}


def mlp():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(2, 8),)


def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 8)).eval(), (torch.randn(2, 128),)


def norm_softmax():
    torch.manual_seed(0)
    return NormSoftmax().eval(), torch.randn(2, 3, 8)  # a bare tensor: one input


def raises():
    raise RuntimeError("no weights here")


def returns_module():
    return nn.Linear(2, 2)


def returns_list_inputs():
    return nn.Linear(2, 2), [torch.randn(1, 2)]


not_a_function = 3
'''

# Passes of these stages only rewrite the graph's form, never its arithmetic.
EXACT_PASSES = {p for stage in ("cleanup", "analysis", "placement") for p in STAGES.get(stage, [])}


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``kiln ARGV`` in-process; returns the exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def factories(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("factories") / "models.py"
    path.write_text(FACTORIES)
    return str(path)


@pytest.fixture(scope="module")
def artifact(factories, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("artifact") / "mlp"
    code, out, err = cli("compile", f"{factories}:mlp", "--target", "cpu", "-o", str(out_dir))
    assert code == 0, err
    return out_dir, out


@pytest.fixture(scope="module")
def inspected(factories, tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump")
    code, out, err = cli("inspect", f"{factories}:norm_softmax", "--target", "cpu", "--dump-dir", str(dump))
    assert code == 0, err
    return dump, out


# ---- compile and run ---------------------------------------------------------------------------

def test_compile_writes_an_artifact_and_summarises_it(artifact):
    path, out = artifact
    assert {"manifest.json", "weights.safetensors", "example_inputs.safetensors"} <= {f.name for f in path.iterdir()}
    assert "compiled MLP for cpu" in out
    for name in get_pipeline("cpu"):
        assert name in out
    assert "part0_cpu (cpu, tvm-vm)" in out
    assert str(path) in out


def test_run_prints_output_structure_and_time(artifact):
    code, out, _ = cli("run", str(artifact[0]), "--repeat", "3")
    assert code == 0
    assert re.search(r"output\s*│\s*\(2, 4\)\s*│\s*float32", out)
    assert "median wall-clock time of 3 runs" in out


def test_run_writes_a_chrome_trace_of_every_task(artifact, tmp_path):
    code, out, err = cli("run", str(artifact[0]), "--repeat", "2", "--trace", str(tmp_path / "t.json"))
    assert code == 0, err
    assert "1 task on 1 queue (cpu0)" in out
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    complete = [e["name"] for e in events if e["ph"] == "X"]
    assert f"wrote the trace of {len(complete)} tasks to" in out
    assert complete == ["part0_cpu"] * len(complete) and len(complete) >= 2  # the timed runs (and the warm-up)
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} == {"cpu0"}


def test_run_names_the_leaves_of_a_structured_output(factories, tmp_path):
    assert cli("compile", f"{factories}:norm_softmax", "-o", str(tmp_path / "a"))[0] == 0
    code, out, _ = cli("run", str(tmp_path / "a"), "--repeat", "1")
    assert code == 0
    assert re.search(r"\['probs'\]\s*│\s*\(2, 3, 8\)", out)
    assert re.search(r"\['scores'\]\s*│\s*\(2, 3, 8\)", out)


def test_run_in_a_fresh_process_never_imports_the_compiler(artifact):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kiln", "run", str(artifact[0]), "--repeat", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(2, 4)" in proc.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "kiln.runtime" in imported
    assert not {m for m in imported if m.startswith(("kiln.passes", "kiln.api", "kiln.backends"))}


def test_compile_skips_passes(factories, tmp_path):
    code, out, _ = cli("compile", f"{factories}:mlp", "-o", str(tmp_path / "a"), "--skip", "fold_constants")
    assert code == 0
    assert "fold_constants (skipped)" in out


def test_run_without_stored_inputs_is_an_error(factories, tmp_path):
    import kiln

    model, inputs = load_factory(f"{factories}:mlp")
    kiln.compile(model, inputs, options=kiln.CompileOptions(keep_example_inputs=False)).save(tmp_path / "a")
    code, _, err = cli("run", str(tmp_path / "a"))
    assert code == 1
    assert err.startswith("error: ") and "holds no example inputs" in err


# ---- inspect -----------------------------------------------------------------------------------

def _rows(out: str) -> dict[str, list[str]]:
    """Table rows by pass name: the cells of each line of the pass table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 9:
            rows[cells[1]] = cells
    return rows


def test_inspect_shows_every_pass_with_its_drift(inspected):
    _, out = inspected
    rows = _rows(out)
    pipeline = get_pipeline("cpu")
    assert [name for name in rows if name != "(traced)"] == pipeline
    assert rows["(traced)"][-1] == "0"
    for name in pipeline:
        float(rows[name][2])  # the time column holds milliseconds
        if name in EXACT_PASSES:
            assert rows[name][-1] == "0", (name, rows[name])
    assert rows["fold_constants"][3] != "0"  # it added the folded scale
    assert "partition part0_cpu: backend cpu, format tvm-vm" in out
    assert "aten.softmax" in out  # the cpu backend's report lists the ops it runs
    # The GEMM's kernel, chosen from the times measured for each candidate.
    assert re.search(r"linear_bias \[6x8\] x \[8x8\] x1 -> (mkl|onednn)  \(mkl [\d.]+, onednn [\d.]+\)", out), out


def test_compile_with_gemm_kernels_onednn_records_the_choice(factories, tmp_path):
    code, _, err = cli("compile", f"{factories}:mlp", "-o", str(tmp_path / "a"), "--gemm-kernels", "onednn")
    assert code == 0, err
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    (part,) = manifest["programs"]["main"]["tasks"]
    assert part["report"]["dispatched"] == {"kiln.linear_bias_onednn": 2}
    assert [g["kernel"] for g in part["report"]["gemm_kernels"]] == ["onednn", "onednn"]
    code, out, _ = cli("run", str(tmp_path / "a"), "--repeat", "1")
    assert code == 0


def test_inspect_shows_each_plan_its_bits_and_drift_and_each_layer_s_bytes_and_view_errors(factories):
    code, out, err = cli("inspect", f"{factories}:wide_mlp", "--target", "torch", "--quantize", "w8=8,mix=5.0,w2=2")
    assert code == 0, err
    plans = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in out.splitlines() if line.count("│") == 5 and line.split("│")[1].strip().startswith(("w", "m"))}
    assert set(plans) == {"w8 (default)", "mix", "w2"}
    assert plans["w8 (default)"][:2] == ["8.00", "0=8 2=8"] and plans["w2"][:2] == ["2.00", "0=2 2=2"]
    drift = {name: float(cells[2]) for name, cells in plans.items()}
    assert 0 < drift["w8 (default)"] < drift["w2"]  # narrower plans move the outputs more
    assert "nested weights" in out and "sensitivity" in out
    # the views each layer holds are those some plan reads: mix gives group 0 four bits, group 2 eight
    assert re.search(r"nested_linear_default\s+│\s*0\s*│\s*256x128\s*│\s*8/4/2\s", out), out
    assert re.search(r"nested_linear_default_1\s+│\s*2\s*│\s*8x256\s*│\s*8/2\s", out), out


def test_dump_dir_holds_snapshots_diffs_and_pictures(inspected):
    dump, _ = inspected
    pipeline = get_pipeline("cpu")
    snapshots = ["000_input.txt"] + [f"{i:03d}_{name}.txt" for i, name in enumerate(pipeline, 1)]
    texts = [(dump / name).read_text() for name in snapshots]
    changed = [f"{name[:-4]}.diff" for name, before, after in zip(snapshots[1:], texts, texts[1:]) if before != after]
    assert "003_fold_constants.diff" in changed
    assert len(changed) < len(pipeline)  # this model gives some passes nothing to do
    assert sorted(f.name for f in dump.iterdir()) == sorted(snapshots + changed + ["graph.svg", "graph.html",
                                                                                   "graph.dot"])
    for name in changed:
        diff = (dump / name).read_text()
        assert diff.startswith("--- ") and "\n+" in diff
    assert "_folded" in (dump / "003_fold_constants.diff").read_text()

    # One box per node of the final graph: inputs and weights, compute nodes, and the output.
    final_nodes = set(re.findall(r"%(\w+):", texts[-1])) | {"output"}
    svg = ET.fromstring((dump / "graph.svg").read_text())
    ns = "{http://www.w3.org/2000/svg}"
    boxes = [g for g in svg.iter(f"{ns}g") if g.get("class", "").split()[:1] == ["node"]]
    assert {g.get("id") for g in boxes} == {f"node-{n}" for n in final_nodes}
    assert all(g.find(f"{ns}rect") is not None for g in boxes)
    edges = svg.findall(f".//{ns}path[@class='edge']")
    dot = (dump / "graph.dot").read_text()
    assert dot.startswith("digraph") and dot.count(" -> ") == len(edges) > 0
    html = (dump / "graph.html").read_text()
    assert "<svg" in html and "placement: cpu" in html


def test_dump_dir_reused_drops_stale_dumps_and_keeps_other_files(factories, tmp_path):
    (tmp_path / "009_old_pass.diff").write_text("stale")
    (tmp_path / "notes.txt").write_text("mine")
    code, out, _ = cli("inspect", f"{factories}:mlp", "--skip", "fold_constants", "--dump-dir", str(tmp_path))
    assert code == 0
    assert _rows(out)["fold_constants"][2] == "skipped"
    names = {f.name for f in tmp_path.iterdir()}
    assert "notes.txt" in names and "009_old_pass.diff" not in names
    assert not [n for n in names if "fold_constants" in n]  # a skipped pass leaves no snapshot


def test_tir_prints_a_kernel_and_an_unknown_name_lists_the_kernels(factories):
    code, _, err = cli("inspect", f"{factories}:mlp", "--tir", "no_such_kernel")
    assert code == 1
    found = re.search(r"no TIR kernel named 'no_such_kernel'; the kernels are: (.+)", err)
    assert found, err
    kernel = found.group(1).split(", ")[0]
    code, out, _ = cli("inspect", f"{factories}:mlp", "--tir", kernel)
    assert code == 0
    assert "@T.prim_func" in out and ("T.vectorized" in out or "T.parallel" in out)  # a scheduled kernel
    code, _, err = cli("inspect", f"{factories}:mlp", "--target", "torch", "--tir", kernel)
    assert code == 1
    assert "no partition was lowered to TIR kernels (backends used: torch)" in err


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("{file}", r"is not FILE.py:FACTORY: put a ':'"),
    ("{dir}/missing.py:mlp", r"missing.py: no such file"),
    ("{file}:nope", r"models.py has no 'nope'; the callables it defines are: MLP, NormSoftmax, mlp, "
                    r"norm_softmax, raises, returns_list_inputs, returns_module, wide_mlp$"),
    ("{file}:not_a_function", r"models.py:not_a_function is not a function \(it is of type int\)"),
    ("{file}:raises", r"models.py:raises\(\) raised RuntimeError: no weights here"),
    ("{file}:returns_module", r"models.py:returns_module\(\) returned Linear; it must return \(model: nn.Module"),
    ("{file}:returns_list_inputs", r"returned \(Linear, list\); it must return"),
])
def test_factory_errors_name_the_file_and_factory(factories, spec, message):
    spec = spec.format(file=factories, dir=factories.rsplit("/", 1)[0])
    with pytest.raises(FactoryError, match=message):
        load_factory(spec)


def test_factory_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\nraise ImportError('needs a GPU build')\n")
    with pytest.raises(FactoryError, match=r"importing .*broken.py raised ImportError: needs a GPU build"):
        load_factory(f"{bad}:make")


def test_factory_may_return_one_tensor(factories):
    model, inputs = load_factory(f"{factories}:norm_softmax")
    assert isinstance(model, torch.nn.Module) and isinstance(inputs, tuple) and len(inputs) == 1


@pytest.mark.parametrize("argv, message", [
    (["compile", "{file}:mlp", "--target", "tpu", "-o", "{dir}/x"], "error: unknown target 'tpu'; known targets: cpu"),
    (["inspect", "{file}:mlp", "--pipeline", "fast"],
     f"error: unknown pipeline 'fast'; known pipelines: {', '.join(sorted(PIPELINES))}"),
    (["compile", "{file}:mlp", "--skip", "nope", "-o", "{dir}/x"], "error: unknown pass 'nope'; known passes: "),
    (["inspect", "{file}:raises"], "error: {file}:raises() raised RuntimeError: no weights here"),
    (["run", "{dir}/not-an-artifact"], "error: no kiln artifact at {dir}/not-an-artifact"),
])
def test_kiln_errors_exit_1_with_one_line(factories, argv, message):
    folder = factories.rsplit("/", 1)[0]
    code, out, err = cli(*[a.format(file=factories, dir=folder) for a in argv])
    assert code == 1
    assert err.startswith(message.format(file=factories, dir=folder))
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("argv", [
    [], ["compile", "m.py:f"], ["run", "dir", "--repeat", "0"], ["inspect"], ["frobnicate"],
    ["compile", "m.py:f", "-o", "d", "--gemm-kernels", "fastest"],
    ["compile", "m.py:f", "-o", "d", "--quantize", "w8"], ["inspect", "m.py:f", "--quantize", "w4=four"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage: kiln" in capsys.readouterr().err


# ---- factories that exit, are interrupted or do not trace ------------------------------------

UNRULY = '''
import signal
import sys

import torch
from torch import nn


def exits():
    sys.exit(3)


def exits_bare():
    sys.exit()


def raises_base_exception():
    class Cancelled(BaseException):  # what some libraries raise: not an Exception
        pass
    raise Cancelled("task cancelled")


def ctrl_c():
    signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: Python raises KeyboardInterrupt here


class Interrupted(nn.Module):
    def forward(self, x):
        raise KeyboardInterrupt


def ctrl_c_while_tracing():
    return Interrupted(), (torch.randn(2),)


def shape_error():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(12, 4)).eval(), (torch.randn(2, 8),)
'''


@pytest.fixture(scope="module")
def unruly(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("unruly") / "unruly.py"
    path.write_text(UNRULY)
    return str(path)


def kiln_process(*argv: str) -> subprocess.CompletedProcess:
    """``kiln ARGV`` in a fresh interpreter: what a user at a shell sees (and a Ctrl-C cannot stop pytest)."""
    return subprocess.run([sys.executable, "-m", "kiln", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("factory, message", [
    ("exits", "error: factory {file}:exits called sys.exit(3)\n"),
    ("exits_bare", "error: factory {file}:exits_bare called sys.exit()\n"),
    ("raises_base_exception", "error: {file}:raises_base_exception() raised Cancelled: task cancelled\n"),
])
def test_factory_that_exits_is_a_factory_error(unruly, tmp_path, factory, message):
    code, out, err = cli("compile", f"{unruly}:{factory}", "-o", str(tmp_path / "x"))
    assert (code, out, err) == (1, "", message.format(file=unruly))


def test_factory_file_that_exits_on_import(tmp_path):
    bad = tmp_path / "script.py"
    bad.write_text("import sys\nsys.exit('run me as a script')\n")
    with pytest.raises(FactoryError, match=r"importing .*script.py called sys.exit\('run me as a script'\)$"):
        load_factory(f"{bad}:make")


@pytest.mark.parametrize("factory", ["ctrl_c", "ctrl_c_while_tracing"])
def test_ctrl_c_prints_interrupted_and_exits_130(unruly, tmp_path, factory):
    proc = kiln_process("compile", f"{unruly}:{factory}", "-o", str(tmp_path / "x"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "interrupted\n")


def test_shape_error_prints_only_kilns_error(unruly, tmp_path):
    proc = kiln_process("compile", f"{unruly}:shape_error", "-o", str(tmp_path / "x"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: torch.export could not trace Sequential in submodule '2': RuntimeError: "
                                  "a and b must have same reduction dim"), proc.stderr
    assert len(proc.stderr.splitlines()) < 5, proc.stderr
