"""The emulated `npu` backend: placement refusals with reasons, static shapes, exact int8 results, build counting,
the cost model's arithmetic, artifacts in a fresh process, and tampered NPU specs refused at load."""
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import kiln
import kiln.runtime.npu as npu_stats
from kiln.backends import TARGETS, target_backends
from kiln.backends.npu import NpuBackend, NpuCost, NpuOptions, build_us, handoff_us, modeled_us, node_us
from kiln.errors import ArtifactError, InputMismatchError, KilnError, UnsupportedOpError
from kiln.ir.tracing import trace
from kiln.passes import get_pipeline
from kiln.runtime.artifact import _canonical, _sha256
from kiln.runtime.kernels import load_kernel


def _int8_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g) * 0.02 + 1e-3


class Block(nn.Module):
    """An int8 linear on the NPU between float ops the NPU refuses (norm, float linear, softmax)."""

    def __init__(self, k=8, n=16):
        super().__init__()
        w, s = _int8_weight(n, k, 0)
        self.register_buffer("w", w)
        self.register_buffer("s", s)
        self.b = nn.Parameter(torch.randn(n))
        self.norm = nn.LayerNorm(n)
        self.head = nn.Linear(n, 4)

    def forward(self, x):
        h = torch.ops.kiln.int8_linear(x, self.w, self.s, self.b, 0.05)
        return h, torch.softmax(self.head(self.norm(h)), -1)


def _tasks(compiled):
    return compiled.manifest["programs"]["main"]["tasks"]


def _place_record(compiled):
    return next(r for r in compiled.manifest["programs"]["main"]["passes"] if r["name"] == "place")


def test_target_npu_and_its_pipeline():
    assert TARGETS["npu"] == ["npu", "cpu", "torch"]
    assert get_pipeline("npu") == [*get_pipeline("cpu"), "schedule_blocks"]
    assert isinstance(target_backends("npu")[0], NpuBackend)


def test_int8_nodes_run_on_npu0_exactly_and_refused_ops_run_on_cpu_with_reasons():
    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(5, 8)
    c = kiln.compile(m, (x,), target="npu")
    by_backend = {t["backend"]: t for t in _tasks(c)}
    assert by_backend["npu"]["format"] == "npu-emulated" and by_backend["npu"]["queue"] == "npu0"
    assert by_backend["cpu"]["queue"] == "cpu0"
    assert c.manifest["queues"] == {"cpu0": {"device": "cpu"}, "npu0": {"device": "npu"}}
    npu_graph = by_backend["npu"]["spec"]["graph"]["nodes"]
    assert [n["target"] for n in npu_graph if n["op"] == "call_function"] == ["kiln.int8_linear.default"]
    assert by_backend["npu"]["spec"]["inputs"] == [{"name": "x", "shape": [5, 8], "dtype": "f32"}]

    h, y = c(x)
    h_ref, y_ref = m(x)
    assert torch.equal(h, h_ref)  # the int8 op is exact: bitwise eager's
    torch.testing.assert_close(y, y_ref)

    record = _place_record(c)
    stats, notes = record["stats"], record["notes"]
    assert stats["on_npu"] == 1 and stats["refused_by_npu"] == 3
    assert set(notes) == {"layer_norm", "linear", "softmax"}
    assert notes["linear"] == "aten.linear: a float matmul; the NPU runs int8 x int8 matmuls only (kiln::int8_linear)"
    assert notes["layer_norm"].startswith("aten.layer_norm: a float normalization")
    assert notes["softmax"].startswith("aten.softmax.int: a float softmax")
    assert stats[f"refused_by_npu: {notes['linear']}"] == 1


def test_refusal_reasons_of_the_backend():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            w, s = _int8_weight(6, 4, 1)
            self.register_buffer("w", w)
            self.register_buffer("s", s)

        def forward(self, x):
            # a weight computed in the graph, bf16 activations, a reshape on its own, a stray float op
            a = torch.ops.kiln.int8_linear(x, self.w * 1, self.s, None, 0.1)
            b = torch.ops.kiln.int8_linear(x.to(torch.bfloat16), self.w, self.s, None, 0.1)
            return a.reshape(-1) + 1, b.view(-1, 3), torch.exp(x)

    g = trace(Odd().eval(), (torch.randn(2, 4),))
    npu = NpuBackend()
    reasons = {n.name: npu.refusal(n) for n in g.compute_nodes()}
    lin = [n for n in reasons if n.startswith("int8_linear")]
    assert "its weight is computed in the graph (by mul)" in reasons[lin[0]]
    assert "activations of dtype bfloat16" in reasons[lin[1]]
    assert reasons["exp"] == "aten.exp: outside the NPU's op set (kiln::int8_linear, aten.view, aten.reshape)"
    assert "neither fed by nor feeding an int8 matmul" in reasons["view"]  # its int8 matmul was refused
    assert all(npu.supports(n) == (reasons[n.name] is None) for n in g.compute_nodes())


def test_reshapes_next_to_an_int8_matmul_go_with_it():
    class Reshaping(nn.Module):
        def __init__(self):
            super().__init__()
            w, s = _int8_weight(16, 8, 2)
            self.register_buffer("w", w)
            self.register_buffer("s", s)

        def forward(self, x):  # x: [2, 3, 8] -> rows -> int8 -> [2, 3, 16]
            h = torch.ops.kiln.int8_linear(x.reshape(6, 8), self.w, self.s, None, 0.05)
            h = h.view(2, 3, 16)
            return h, torch.tanh(h)

    m, x = Reshaping().eval(), torch.randn(2, 3, 8)
    c = kiln.compile(m, (x,), target="npu")
    npu_task = next(t for t in _tasks(c) if t["backend"] == "npu")
    ops = [n["target"] for n in npu_task["spec"]["graph"]["nodes"] if n["op"] == "call_function"]
    assert ops == ["aten.view.default", "kiln.int8_linear.default", "aten.view.default"]
    (h, y), (h_ref, y_ref) = c(x), m(x)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y, y_ref)


def test_dynamic_shapes_are_refused_by_the_npu_and_run_on_the_cpu_side():
    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(5, 8)
    options = kiln.CompileOptions(dynamic_shapes=({0: torch.export.Dim("rows", min=2, max=64)},))
    c = kiln.compile(m, (x,), target="npu", options=options)
    assert all(t["backend"] != "npu" and t["queue"] == "cpu0" for t in _tasks(c))
    notes = _place_record(c)["notes"]
    (lin,) = [n for n in notes if n.startswith("int8_linear")]
    assert "symbolic dimension" in notes[lin] and "the NPU compiles static shapes only" in notes[lin]
    for rows in (3, 7):
        x = torch.randn(rows, 8)
        h, y = c(x)
        h_ref, y_ref = m(x)
        assert torch.equal(h, h_ref)
        torch.testing.assert_close(y, y_ref)


def test_graph_builds_are_counted_per_static_graph():
    torch.manual_seed(0)
    m = Block().eval()
    c5 = kiln.compile(m, (torch.randn(5, 8),), target="npu")
    npu_stats.reset()
    c5(torch.randn(5, 8))
    c5(torch.randn(5, 8))
    s = npu_stats.stats()
    spec = next(t for t in _tasks(c5) if t["backend"] == "npu")["spec"]
    assert (s["builds"], s["cache_hits"], s["calls"], s["graphs"]) == (1, 1, 2, 1)
    assert s["modeled_build_us"] == spec["modeled"]["build_us"] == NpuCost().graph_build_us_per_matmul
    assert s["modeled_execute_us"] == pytest.approx(2 * spec["modeled"]["execute_us"])
    # another static shape is another NPU graph: one more build; the first stays cached
    c9 = kiln.compile(m, (torch.randn(9, 8),), target="npu")
    c9(torch.randn(9, 8))
    c5(torch.randn(5, 8))
    s = npu_stats.stats()
    assert (s["builds"], s["cache_hits"], s["calls"], s["graphs"]) == (2, 2, 4, 2)
    assert "modeled" in npu_stats.summary()
    npu_stats.reset()
    assert npu_stats.stats()["builds"] == 0


def test_an_npu_kernel_refuses_another_shape_than_its_static_one():
    torch.manual_seed(0)
    c = kiln.compile(Block().eval(), (torch.randn(5, 8),), target="npu")
    entry = next(t for t in _tasks(c) if t["backend"] == "npu")
    kernel = load_kernel(entry, None, {w: c.artifact.weights[w] for w in entry["weights"]})
    with pytest.raises(InputMismatchError, match=r"input 'x' is f32\[6, 8\], but its NPU graph was built for the "
                                                 r"static type f32\[5, 8\]"):
        kernel(torch.randn(6, 8))


def _matmul_node(rows=128, k=4096, n=4096, bias=True):
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.zeros(n, k, dtype=torch.int8))
            self.register_buffer("s", torch.ones(n))
            self.b = nn.Parameter(torch.zeros(n)) if bias else None

        def forward(self, x):
            return torch.layer_norm(torch.ops.kiln.int8_linear(x, self.w, self.s, self.b, 0.1), [n])

    g = trace(One().eval(), (torch.randn(rows, k),))
    return g, {n.name: n for n in g.compute_nodes()}


def test_cost_model_arithmetic_by_hand():
    g, nodes = _matmul_node()
    lin, norm = nodes["int8_linear"], nodes["layer_norm"]
    # 128 x 4096 x 4096: 2*128*4096*4096 ops at 45 TOPS x 0.25 = 11.25e6 ops/us
    compute = 2 * 128 * 4096 * 4096 / 11.25e6
    assert compute == pytest.approx(381.775, abs=1e-3)
    # bytes: x f32 (128*4096*4) + weight int8 (4096^2) + scale and bias f32 (2*4096*4) + out f32 (128*4096*4)
    nbytes = 128 * 4096 * 4 + 4096 * 4096 + 2 * 4096 * 4 + 128 * 4096 * 4
    memory = nbytes / 76.8e3  # 76.8 GB/s = 76.8e3 bytes/us
    assert memory == pytest.approx(273.49, abs=1e-2)
    assert node_us(lin, "npu") == pytest.approx(max(compute, memory)) == pytest.approx(compute)
    assert NpuBackend().cost(lin) == node_us(lin, "npu")
    # memory-bound at one row: the weight's 16 MiB through DRAM
    _, one = _matmul_node(rows=1)
    assert node_us(one["int8_linear"], "npu") == pytest.approx((4096 * 4 + 4096 * 4096 + 2 * 4096 * 4 + 4096 * 4)
                                                                / 76.8e3)
    # the same matmul on the CPU side at 400 int8 GOPS (4e5 ops/us)
    assert node_us(lin, "cpu") == pytest.approx(max(2 * 128 * 4096 * 4096 / 4e5, memory))
    # a norm on the CPU: one op per element at 100 GFLOPS, or its bytes (in and out f32, weight-less), whichever is more
    assert node_us(norm, "cpu") == pytest.approx(max(128 * 4096 / 1e5, 2 * 128 * 4096 * 4 / 76.8e3))
    with pytest.raises(UnsupportedOpError, match="node layer_norm: the NPU cannot run it: aten.layer_norm"):
        modeled_us(g, "npu")
    assert modeled_us(g, "cpu") == pytest.approx(node_us(lin, "cpu") + node_us(norm, "cpu"))
    assert modeled_us([lin], "npu") == pytest.approx(compute)
    assert build_us(g) == 94_400.0  # one int8 matmul
    assert handoff_us(lin) == pytest.approx(100 + 128 * 4096 * 4 / 76.8e3)
    assert handoff_us(1_000_000, NpuCost(handoff_us=0)) == pytest.approx(1e6 / 76.8e3)
    with pytest.raises(KilnError, match="unknown device 'gpu'"):
        node_us(lin, "gpu")


def test_cost_parameters_are_checked_and_overridable():
    with pytest.raises(KilnError, match="NpuCost.npu_efficiency is a fraction"):
        NpuCost(npu_efficiency=2)
    with pytest.raises(KilnError, match="NpuCost.dram_gbps must be a finite number > 0"):
        NpuCost(dram_gbps=math.inf)
    with pytest.raises(KilnError, match="NpuOptions.cost must be"):
        NpuOptions(cost={"handoff_us": 1})
    torch.manual_seed(0)
    options = kiln.CompileOptions(backend_options={"npu": NpuOptions(cost=NpuCost(graph_build_us_per_matmul=1000.0))})
    c = kiln.compile(Block().eval(), (torch.randn(5, 8),), target="npu", options=options)
    spec = next(t for t in _tasks(c) if t["backend"] == "npu")["spec"]
    assert spec["modeled"]["build_us"] == 1000.0


def test_saved_npu_artifact_runs_in_a_fresh_process(tmp_path, fresh_python):
    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(5, 8)
    kiln.compile(m, (x,), target="npu").save(tmp_path / "art")
    h, y = m(x)
    save_file({"x": x, "h": h.detach(), "y": y.detach()}, str(tmp_path / "io.safetensors"))
    out = fresh_python(f"""
        import json
        import sys
        import kiln, kiln.runtime.npu
        from safetensors.torch import load_file, save_file
        io = load_file({str(tmp_path / 'io.safetensors')!r})
        cm = kiln.load({str(tmp_path / 'art')!r})
        h, y = cm(io["x"])
        h2, _ = cm(io["x"])
        save_file({{"h": h, "y": y, "h2": h2}}, {str(tmp_path / 'out.safetensors')!r})
        leaked = [m for m in sys.modules if m.startswith(("kiln.backends", "kiln.passes", "kiln.api"))]
        print(json.dumps({{"stats": kiln.runtime.npu.stats(), "leaked": leaked}}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    got, io = load_file(str(tmp_path / "out.safetensors")), load_file(str(tmp_path / "io.safetensors"))
    assert torch.equal(got["h"], io["h"]) and torch.equal(got["h2"], io["h"])
    torch.testing.assert_close(got["y"], io["y"])
    assert result["leaked"] == []
    assert (result["stats"]["builds"], result["stats"]["cache_hits"], result["stats"]["calls"]) == (1, 1, 2)


def _npu_task(m):
    return next(t for t in m["programs"]["main"]["tasks"] if t["format"] == "npu-emulated")


def _call(m):
    return next(n for n in _npu_task(m)["spec"]["graph"]["nodes"] if n["op"] == "call_function")


@pytest.mark.parametrize("edit, message", [
    (lambda m: _call(m).update(target="aten.softmax.int"),
     r"node int8_linear calls aten.softmax.int, which the NPU does not run"),
    (lambda m: _npu_task(m)["spec"].update(digest="0" * 64), "field spec.digest does not match its graph"),
    (lambda m: _npu_task(m)["spec"]["inputs"][0].update(shape=["s0", 8]),
     r"spec.inputs\[0\].shape\[0\] must be of type integer, not a string"),
    (lambda m: _npu_task(m)["spec"]["inputs"][0].update(shape=[6, 8]),
     r"input 'x' is declared f32\[6, 8\] in field spec.inputs, but its graph placeholder is typed"),
    (lambda m: _npu_task(m)["spec"]["modeled"].update(execute_us=-1), r"spec.modeled.execute_us: -1 is less than"),
    (lambda m: _npu_task(m)["spec"].pop("digest"), r"spec.digest is missing"),
    (lambda m: _npu_task(m)["spec"]["inputs"].clear(), r"field spec.inputs declares 0 static input types"),
])
def test_a_tampered_npu_spec_is_refused_at_load(tmp_path, edit, message):
    torch.manual_seed(0)
    path = kiln.compile(Block().eval(), (torch.randn(5, 8),), target="npu").save(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_sha256"] = _sha256(_canonical(manifest))
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        kiln.load(path)


FACTORY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randint(-127, 128, (16, 8), dtype=torch.int8, generator=g))
        self.register_buffer("s", torch.rand(16, generator=g) * 0.02 + 1e-3)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return torch.softmax(self.norm(torch.ops.kiln.int8_linear(x, self.w, self.s, None, 0.05)), -1)


def block():
    torch.manual_seed(0)
    return Block().eval(), (torch.randn(5, 8),)
'''


def _cli(*argv):
    import contextlib
    import io

    from kiln.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    assert code == 0, err.getvalue()
    return out.getvalue()


def test_cli_inspect_lists_the_refusals_and_run_labels_npu_times_modeled(tmp_path):
    factory = tmp_path / "models.py"
    factory.write_text(FACTORY)
    out = _cli("inspect", f"{factory}:block", "--target", "npu")
    assert "on_npu=1" in out and "refused_by_npu=2" in out
    assert "pass place: notes on 2 nodes" in out
    assert "aten.layer_norm: a float normalization; it stays on the CPU" in out
    assert "partition part0_npu: backend npu, format npu-emulated" in out
    assert "modeled execute (us per call)" in out and "modeled graph build (us): 94400.0" in out
    _cli("compile", f"{factory}:block", "--target", "npu", "-o", str(tmp_path / "art"))
    out = _cli("run", str(tmp_path / "art"), "--repeat", "2")
    assert "(measured here; the npu tasks emulated on this CPU)" in out
    # one call before timing, one warm-up, two timed: one build, every later call a cache hit
    assert re.search(r"npu \(emulated\): 4 calls, 1 graph builds \(modeled 94\.4 ms\), 3 build-cache hits, "
                     r"modeled execute [\d.e+-]+ us", out.replace("\n", " ")), out
