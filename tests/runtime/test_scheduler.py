"""Artifact format 2: programs of task DAGs on queues, the scheduler, its trace, run-time controls, one weight store."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from jsonschema import Draft202012Validator
from safetensors import safe_open
from torch import nn

import kiln
from kiln import zoo
from kiln.errors import ArtifactError
from kiln.passes import Pass, PassResult, get_pipeline
from kiln.runtime import CompiledModel, ControlError, Trace
from kiln.runtime.artifact import declare_control, merge_programs, place_on_queues


@pytest.fixture(scope="module")
def branches():
    m, (x,) = zoo.branches()
    return m, x, kiln.compile(m, (x,))


def _two_queues(cm) -> CompiledModel:
    """The same artifact with its second branch on queue cpu1 (a test hook: placement only uses cpu0 today)."""
    artifact = kiln.runtime.Artifact(json.loads(json.dumps(cm.manifest)), cm.artifact.weights, cm.artifact.files)
    tasks = artifact.manifest["programs"]["main"]["tasks"]
    gemm_b = next(t["name"] for t in tasks if "p_b_weight" in t["weights"])
    frac_b = next(t["name"] for t in tasks if t["after"] == [gemm_b])
    place_on_queues(artifact.manifest, {gemm_b: "cpu1", frac_b: "cpu1"})
    return CompiledModel(artifact)


def test_a_program_on_two_queues_runs_bitwise_equal_to_sequential(branches, tmp_path):
    m, x, cm = branches
    tasks = cm.manifest["programs"]["main"]["tasks"]
    assert len(tasks) >= 4, [(t["name"], t["backend"]) for t in tasks]
    assert all(t["queue"] == "cpu0" for t in tasks)
    assert tasks[-1]["after"], "the join waits for both branches"
    two = _two_queues(cm)
    assert two.default_program.queues == ["cpu0", "cpu1"]
    expected = cm(x)
    for _ in range(5):
        assert torch.equal(two(x), expected)
    torch.testing.assert_close(expected, m(x))
    loaded = kiln.load(two.save(tmp_path / "two"))  # the queues survive a save
    assert loaded.default_program.queues == ["cpu0", "cpu1"]
    assert torch.equal(loaded(x), expected)


class SecondBranchOnCpu1(Pass):
    """As a scheduling pass would: the nodes computing from ``b``'s weight go to queue cpu1."""

    name = "second_branch_on_cpu1"

    def run(self, graph, ctx):
        on_b = {graph.node("p_b_weight")}
        for node in graph.compute_nodes():
            if node in on_b or any(i in on_b for i in node.all_input_nodes):
                on_b.add(node)
                if node.target is not torch.ops.aten.mul.Tensor:  # the join stays on cpu0
                    graph.meta(node).queue = "cpu1"
        return PassResult(True)


def test_queues_set_on_nodes_by_a_pass_become_tasks_on_those_queues(branches):
    m, x, cm = branches
    passes = [p for p in get_pipeline("cpu") if p != "place"] + [SecondBranchOnCpu1(), "place"]
    queued = kiln.compile(m, (x,), passes=passes)
    tasks = queued.manifest["programs"]["main"]["tasks"]
    on_cpu1 = [t for t in tasks if t["queue"] == "cpu1"]
    assert on_cpu1 and all("p_a_weight" not in t["weights"] for t in on_cpu1)
    assert queued.default_program.queues == ["cpu0", "cpu1"]
    assert sorted(queued.manifest["queues"]) == ["cpu0", "cpu1"]
    assert torch.equal(queued(x), cm(x))


def test_a_failing_task_on_one_queue_raises_and_the_other_queue_stops(branches, monkeypatch):
    _, x, cm = branches
    two = _two_queues(cm)
    program = two.default_program
    name, queue, inputs, outputs, _, after = next(t for t in program._tasks if t[1] == "cpu1")

    def boom(*args):
        raise RuntimeError("kernel failed")
    program._tasks = [(n, q, i, o, boom if n == name else k, a) for n, q, i, o, k, a in program._tasks]
    with pytest.raises(RuntimeError, match="kernel failed"):
        two(x)


# Chrome's trace-event format ("Trace Event Format", Google): a JSON object with traceEvents; a complete
# event has ph "X", a name, categories, a timestamp and a duration in microseconds, a process and a thread id.
TRACE_EVENT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "required": ["traceEvents"],
    "properties": {
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "traceEvents": {"type": "array", "items": {"oneOf": [
            {"type": "object", "required": ["name", "cat", "ph", "ts", "dur", "pid", "tid"],
             "properties": {"name": {"type": "string"}, "cat": {"type": "string"}, "ph": {"const": "X"},
                            "ts": {"type": "number"}, "dur": {"type": "number", "minimum": 0},
                            "pid": {"type": "integer"}, "tid": {"type": "integer"}, "args": {"type": "object"}}},
            {"type": "object", "required": ["name", "ph", "pid", "args"],
             "properties": {"name": {"enum": ["process_name", "thread_name", "process_sort_index",
                                              "thread_sort_index"]},
                            "ph": {"const": "M"}, "pid": {"type": "integer"}, "tid": {"type": "integer"},
                            "args": {"type": "object"}}},
        ]}},
    },
}


def test_the_trace_is_chrome_trace_event_json_with_one_thread_per_queue(branches, tmp_path):
    _, x, cm = branches
    two = _two_queues(cm)
    with two.tracing() as trace:
        two(x)
        two(x)
    path = trace.save(tmp_path / "trace.json")
    data = json.loads(path.read_text())
    Draft202012Validator(TRACE_EVENT_SCHEMA).validate(data)
    complete = [e for e in data["traceEvents"] if e["ph"] == "X"]
    tasks = cm.manifest["programs"]["main"]["tasks"]
    assert len(complete) == 2 * len(tasks)
    threads = {e["args"]["name"]: e["tid"] for e in data["traceEvents"] if e["ph"] == "M"}
    assert set(threads) == {"cpu0", "cpu1"}
    queue_of = {t["name"]: t["queue"] for t in two.manifest["programs"]["main"]["tasks"]}
    for e in complete:
        assert e["tid"] == threads[queue_of[e["name"]]] and e["cat"] == "main"
    # a task starts after the tasks it waits for have ended, across queues too
    first_call = {e["name"]: e for e in complete[:len(tasks)]}
    for t in tasks:
        for dep in t["after"]:
            assert first_call[t["name"]]["ts"] >= first_call[dep]["ts"] + first_call[dep]["dur"]
    assert not two._trace  # recording stops with the block
    explicit = Trace()
    two.run([x], trace=explicit)
    assert len(explicit.events) == len(tasks)


class AddK(nn.Module):
    def forward(self, x, k):
        return x * 2 + k


@pytest.fixture
def with_control():
    x = torch.randn(3, 4)
    cm = kiln.compile(AddK(), (x, torch.tensor(0)), target="torch")
    (program,) = cm.artifact.manifest["programs"].values()
    declare_control(program, "k", default=1, min=0, max=4)
    return x, CompiledModel(cm.artifact)


def test_controls_list_their_allowed_values_and_are_set_between_calls(with_control, tmp_path):
    x, cm = with_control
    assert list(cm.controls) == ["k"] and cm.controls["k"].allowed == range(0, 5)
    assert [i.name for i in cm.signature.inputs] == ["x"]  # the caller no longer passes it
    assert torch.equal(cm(x), x * 2 + 1)  # the default
    cm.set_controls(k=3)
    assert torch.equal(cm(x), x * 2 + 3)
    cm.set_controls(k=0)
    assert torch.equal(cm(x), x * 2)
    loaded = kiln.load(cm.save(tmp_path / "a"))
    assert loaded.controls["k"].value == 1 and torch.equal(loaded(x), x * 2 + 1)


def test_an_invalid_control_value_names_the_control_and_its_allowed_values(with_control):
    x, cm = with_control
    with pytest.raises(ControlError, match=r"control 'k' cannot be 5; it allows an integer from 0 to 4"):
        cm.set_controls(k=5)
    with pytest.raises(ControlError, match=r"control 'k' cannot be '2'; it allows an integer from 0 to 4"):
        cm.set_controls(k="2")
    with pytest.raises(ControlError, match=r"program 'main' has no control 'bits'; its controls are k"):
        cm.set_controls(bits=4)
    assert cm.controls["k"].value == 1  # nothing was set


def test_a_policy_sets_controls_before_every_call(with_control):
    x, cm = with_control
    seen = []

    def policy(program, controls):
        seen.append((program, dict(controls)))
        return {"k": len(seen) % 5}
    cm.policy = policy
    assert torch.equal(cm(x), x * 2 + 1)
    assert torch.equal(cm(x), x * 2 + 2)
    assert seen == [("main", {"k": 1}), ("main", {"k": 1})]
    cm.policy = lambda program, controls: {"k": 7}
    with pytest.raises(ControlError, match="control 'k' cannot be 7"):
        cm(x)


def test_control_values_for_one_call_or_one_block_leave_the_model_s_own(with_control):
    x, cm = with_control
    assert torch.equal(cm.run([x], controls={"k": 4})[0], x * 2 + 4)
    with cm.using(k=3):
        assert torch.equal(cm(x), x * 2 + 3)
        with cm.using(k=0):
            assert torch.equal(cm(x), x * 2)
        assert torch.equal(cm.run([x], controls={"k": 2})[0], x * 2 + 2)  # the call's own value wins
        assert torch.equal(cm(x), x * 2 + 3)
    assert cm.controls["k"].value == 1 and torch.equal(cm(x), x * 2 + 1)
    with pytest.raises(ControlError, match=r"control 'k' cannot be 9"):
        with cm.using(k=9):
            pass
    with pytest.raises(ControlError, match=r"has no control 'bits'"):
        cm.run([x], controls={"bits": 4})


def test_concurrent_callers_each_run_with_their_own_control_values(with_control):
    x, cm = with_control
    start = threading.Barrier(4)

    def caller(k):
        start.wait()
        with cm.using(k=k):
            return [bool(torch.equal(cm(x), x * 2 + k)) for _ in range(300)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(caller, [0, 1, 3, 4]))
    assert all(all(r) for r in results)


def test_a_call_reads_one_consistent_set_of_values_while_another_thread_sets_them():
    x = torch.randint(-5, 5, (3, 4))
    cm = kiln.compile(AddTwo(), (x, torch.tensor(0), torch.tensor(0)), target="torch")
    (program,) = cm.artifact.manifest["programs"].values()
    declare_control(program, "a", default=0, min=0, max=1000)
    declare_control(program, "b", default=0, min=-1000, max=0)
    cm = CompiledModel(cm.artifact)
    stop = threading.Event()

    def setter():
        i = 0
        while not stop.is_set():
            i = (i + 1) % 1000
            cm.set_controls(a=i, b=-i)  # a + b is 0 in every consistent set

    thread = threading.Thread(target=setter)
    thread.start()
    try:
        outputs = [cm(x) for _ in range(500)]
    finally:
        stop.set()
        thread.join()
    assert all(torch.equal(out, x) for out in outputs)


class AddTwo(nn.Module):
    def forward(self, x, a, b):
        return x + a + b


def test_an_enum_control_feeds_the_index_of_its_value():
    x = torch.randn(3, 4)
    cm = kiln.compile(AddK(), (x, torch.tensor(0)), target="torch")
    declare_control(cm.artifact.manifest["programs"]["main"], "k", default="int8", values=["int8", "int4", "int2"])
    cm = CompiledModel(cm.artifact)
    assert cm.controls["k"].allowed == ("int8", "int4", "int2")
    cm.set_controls(k="int2")
    assert torch.equal(cm(x), x * 2 + 2)
    with pytest.raises(ControlError, match=r"cannot be 'int3'; it allows one of 'int8', 'int4', 'int2'"):
        cm.set_controls(k="int3")


# ---- the v2 manifest checks at load ----

def _prog(m):
    return m["programs"]["main"]


def _second_task(m):
    first = _prog(m)["tasks"][0]
    second = json.loads(json.dumps(first))
    second.update(name="second", outputs=[o + "_2" for o in first["outputs"]], after=[first["name"]])
    _prog(m)["tasks"].append(second)
    return first, second


def test_a_cycle_of_tasks_is_refused_at_load(torch_saved, no_kernel_loads, rewrite_manifest):
    def cycle(m):
        first, second = _second_task(m)
        first["after"] = ["second"]
    rewrite_manifest(torch_saved, cycle)
    with pytest.raises(ArtifactError, match=r"programs\['main'\]: the tasks' dependencies form a cycle: "
                                            r"part0_torch -> second -> part0_torch \(field after\)"):
        kiln.load(torch_saved)


def test_a_task_waiting_for_itself_is_a_cycle(torch_saved, no_kernel_loads, rewrite_manifest):
    rewrite_manifest(torch_saved, lambda m: _prog(m)["tasks"][0].update(after=["part0_torch"]))
    with pytest.raises(ArtifactError, match=r"cycle: part0_torch -> part0_torch"):
        kiln.load(torch_saved)


@pytest.mark.parametrize("edit, message", [
    (lambda m: _prog(m)["tasks"][0].update(queue="npu0"),
     r"tasks\[0\] \('part0_torch'\) runs on queue 'npu0', which field queues does not declare \(it declares cpu0\)"),
    (lambda m: m["queues"].update(tpu0={"device": "tpu"}),
     r"queue 'tpu0' runs on device 'tpu', which this runtime has no worker for \(known: cpu, npu\)"),
    (lambda m: m["queues"].update({"cpu 0": {"device": "cpu"}}), r"field queues: 'cpu 0' does not match"),
    (lambda m: m.update(default_program="prefill_8"),
     r"field default_program names program 'prefill_8', which is not in field programs \(it has main\)"),
    (lambda m: m.update(llm={"prefill": {"8": "prefill_8"}, "decode": "main"}),
     r"field llm names program 'prefill_8', which is not in field programs"),
    (lambda m: _prog(m)["tasks"][0].update(after=["ghost"]),
     r"field after names tasks \['ghost'\] that this program does not have"),
    (lambda m: _second_task(m)[1].update(name="part0_torch"), r"task name 'part0_torch' is used twice"),
    (lambda m: _prog(m).update(controls=[{"name": "k", "dtype": "i64", "default": 9, "min": 0, "max": 4}]),
     r"controls\[0\] \('k'\): its default 9 is not one of its allowed values \(an integer from 0 to 4\)"),
    (lambda m: _prog(m).update(controls=[{"name": "k", "dtype": "i64", "default": 0, "min": 0}]),
     r"field programs.main.controls\[0\]"),
    (lambda m: m["programs"].update(extra=_prog(m)) or m.update(default_program="extra") or
     m["programs"].pop("main"), None),  # renaming the one program is fine
])
def test_v2_manifest_checks_name_the_field(torch_saved, torch_compiled, no_kernel_loads, rewrite_manifest, monkeypatch,
                                           edit, message):
    rewrite_manifest(torch_saved, edit)
    if message is None:
        monkeypatch.undo()  # kernels may load: this one is valid
        _, x, cm = torch_compiled
        assert torch.equal(kiln.load(torch_saved)(x), cm(x))
        return
    with pytest.raises(ArtifactError, match=message):
        kiln.load(torch_saved)


def test_programs_share_one_weight_store_with_every_tensor_once(compiled, tmp_path):
    m, x, cm = compiled
    other = kiln.compile(m, (torch.randn(7, 8),))  # another shape of the same model: the same weights
    merged = merge_programs({"batch3": cm.artifact, "batch7": other.artifact}, default_program="batch3")
    path = CompiledModel(merged).save(tmp_path / "both")
    manifest = json.loads((path / "manifest.json").read_text())
    with safe_open(path / "weights.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(cm.artifact.weights)  # stored once, though two programs read them
    single = cm.save(tmp_path / "one")
    assert (path / "weights.safetensors").stat().st_size == (single / "weights.safetensors").stat().st_size
    # each program's library is kept; the second's name is taken, so it is stored under the program's name
    libraries = [t["files"] for p in manifest["programs"].values() for t in p["tasks"]]
    assert libraries == [["part0_cpu.so"], ["batch7.part0_cpu.so"]]
    loaded = kiln.load(path)
    x7 = torch.randn(7, 8)
    for got, ref in ((loaded(x), cm(x)), (loaded.programs["batch7"](x7), other(x7))):
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# ---- a selector: the control that picks the program (a nested-quantized model's plans) ----

@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)).eval(), torch.randn(2, 128)
    cm = kiln.compile(m, (x,), target="torch", options=kiln.CompileOptions(quantization=kiln.NestedQuantization()))
    return x, cm, cm.save(tmp_path_factory.mktemp("planned") / "a")


def _drop_signature_input(m):
    m["programs"]["w2"]["signature"]["inputs"][0]["shape"] = [3, 128]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["selector"]["values"].append("w3"), r"field selector names program 'w3', which is not in field "
                                                      r"programs \(it has w2, w4, w8\)"),
    (lambda m: m["selector"].update(default="w3"), r"field selector.default 'w3' is not one of its values"),
    (_drop_signature_input, r"the programs of field selector differ in their signature: 'w8' and 'w2'"),
    (lambda m: m["selector"].pop("default"), r"selector.*default"),
])
def test_a_selector_naming_what_is_not_there_is_refused_at_load(planned, tmp_path, rewrite_manifest, edit, message):
    import shutil
    _, _, path = planned
    copy = shutil.copytree(path, tmp_path / "b")
    rewrite_manifest(copy, edit)
    with pytest.raises(ArtifactError, match=message):
        kiln.load(copy)


def test_the_selected_program_runs_and_its_choice_is_local_to_a_using_block(planned):
    x, cm, path = planned
    loaded = kiln.load(path)
    assert loaded.selected() == "w8" and loaded.selected({"plan": "w2"}) == "w2"
    with loaded.using(plan="w4"):
        assert loaded.selected() == "w4"
        assert torch.equal(loaded(x), cm.run([x], controls={"plan": "w4"})[0])
    assert loaded.selected() == "w8"
