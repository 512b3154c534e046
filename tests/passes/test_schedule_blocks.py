"""ScheduleBlocks: the chain DAG's dependencies, the critical-path list schedule, order checking."""
import pytest

from kiln.errors import KilnError
from kiln.passes.schedule_blocks import (chain_dag, check_order, in_order_schedule, list_schedule, schedule_chain,
                                         upward_rank)


def _program():
    """One layer of a chunk, as ScheduleBlocks sees it: int8 QKV on npu0, attention on cpu0, int8 FFN on npu0.

    ``attn`` reads the KV carried from the step before (input ``kv``, fed by output 1, which ``attn`` computes);
    ``ffn`` computes only the final output, so a step before the last skips it.
    """
    tasks = [
        {"name": "qkv", "queue": "npu0", "inputs": ["x"], "outputs": ["q"], "after": []},
        {"name": "attn", "queue": "cpu0", "inputs": ["q", "kv"], "outputs": ["a", "kv_new"], "after": ["qkv"]},
        {"name": "ffn", "queue": "npu0", "inputs": ["a"], "outputs": ["y"], "after": ["attn"]},
    ]
    return {"signature": {"inputs": [{"name": "x"}, {"name": "kv"}]}, "tasks": tasks,
            "outputs": [{"value": "y"}, {"value": "kv_new"}]}


COSTS = {"qkv": 4.0, "attn": 3.0, "ffn": 4.0}


def test_the_chain_dag_has_each_steps_dependencies_and_the_carried_ones():
    dag = chain_dag(_program(), {1: "kv"}, 3, COSTS)
    assert len(dag) == 7 and (0, "ffn") not in dag and (1, "ffn") not in dag  # only the last step's output is kept
    assert set(dag.predecessors((1, "attn"))) == {(1, "qkv"), (0, "attn")}  # its own q, the KV of step 0
    assert set(dag.predecessors((1, "qkv"))) == set()  # nothing carried: free to run beside step 0
    assert set(dag.predecessors((2, "ffn"))) == {(2, "attn")}


def test_upward_rank_by_hand():
    dag = chain_dag(_program(), {1: "kv"}, 2, COSTS)
    rank = upward_rank(dag, sync_us=1.0)
    # (1, ffn) = 4; (1, attn) = 3 + 1 + 4 = 8; (1, qkv) = 4 + 1 + 8 = 13
    # (0, attn) = 3 + 0 + 8 (same queue as (1, attn)) = 11; (0, qkv) = 4 + 1 + 11 = 16
    assert rank == {(1, "ffn"): 4, (1, "attn"): 8, (1, "qkv"): 13, (0, "attn"): 11, (0, "qkv"): 16}


def test_the_list_schedule_overlaps_steps_and_beats_in_order():
    program = _program()
    dag = chain_dag(program, {1: "kv"}, 2, COSTS)
    ooo = list_schedule(dag)
    ino = in_order_schedule(dag, program)
    assert ino.makespan == 18  # (4 + 3) + (4 + 3 + 4)
    # npu0: qkv0 [0,4] qkv1 [4,8] ffn1 [11,15]; cpu0: attn0 [4,7] attn1 [8,11]
    assert ooo.orders == {"npu0": [(0, "qkv"), (1, "qkv"), (1, "ffn")], "cpu0": [(0, "attn"), (1, "attn")]}
    assert ooo.makespan == 15
    for schedule in (ooo, ino):
        check_order(dag, schedule.orders)
        for a, b in dag.edges:
            assert schedule.start[b] >= schedule.end[a]


def test_check_order_refuses_a_missing_task_a_wrong_queue_and_a_deadlock():
    dag = chain_dag(_program(), {1: "kv"}, 2, COSTS)
    good = list_schedule(dag).orders
    with pytest.raises(KilnError, match="never run"):
        check_order(dag, {"npu0": good["npu0"], "cpu0": good["cpu0"][:1]})
    with pytest.raises(KilnError, match="belongs on queue cpu0"):
        check_order(dag, {"npu0": good["npu0"] + [(1, "attn")], "cpu0": good["cpu0"][:1]})
    swapped = {"npu0": [(0, "qkv"), (1, "qkv"), (1, "ffn")], "cpu0": [(1, "attn"), (0, "attn")]}
    with pytest.raises(KilnError, match="deadlock"):
        check_order(dag, swapped)


def test_schedule_chain_records_orders_for_every_length_and_refuses_bad_carry():
    chain = schedule_chain(_program(), {1: "kv"}, 3, COSTS, cost_source="modeled")
    assert sorted(chain["orders"]) == ["1", "2", "3"]
    assert chain["makespans"]["2"] == {"in_order_us": 18.0, "out_of_order_us": 15.0}
    assert chain["costs"]["source"] == "modeled"
    with pytest.raises(KilnError, match="not an input"):
        schedule_chain(_program(), {1: "nope"}, 2, COSTS, cost_source="modeled")
    with pytest.raises(KilnError, match="cost for every task"):
        schedule_chain(_program(), {1: "kv"}, 2, {"qkv": 1.0}, cost_source="modeled")
    with pytest.raises(KilnError, match="cost_source"):
        schedule_chain(_program(), {1: "kv"}, 2, COSTS, cost_source="guessed")


def test_a_schedule_as_a_trace_is_valid_trace_event_json_marked_modeled():
    from jsonschema import validate

    from tests.runtime.test_scheduler import TRACE_EVENT_SCHEMA

    dag = chain_dag(_program(), {1: "kv"}, 2, COSTS)
    trace = list_schedule(dag).to_trace("out-of-order")
    validate(trace, TRACE_EVENT_SCHEMA)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 5 and all(e["cat"] == "modeled" for e in spans)
    assert {e["name"]: e["ts"] for e in spans}["ffn@1"] == 11


def _placed_layer():
    """A tiny Llama chunk traced, int8-quantized and placed for the npu target (everything before schedule_blocks)."""
    import torch

    import kiln
    from kiln import zoo
    from kiln.api import Compilation
    from kiln.llm.hf import LayerwiseKVCacheLM
    from kiln.passes import get_pipeline
    from kiln.passes.extract_outliers import Int8Quantization

    model, _ = zoo.llama(hidden=64, layers=1, seq=32)
    lm = LayerwiseKVCacheLM(model)
    k, v = lm.empty_cache(1, 32)
    inputs = (torch.zeros(1, 8, dtype=torch.long), torch.tensor(0), k, v)
    passes = [p for p in get_pipeline("npu") if p != "schedule_blocks"]
    c = Compilation("npu", passes, kiln.CompileOptions(int8=Int8Quantization()))
    graph = c.trace(lm, inputs)
    c.optimize()
    return graph, c.flat_inputs


def test_the_pass_groups_each_devices_ready_work_and_keeps_the_results():
    import torch

    from kiln.ir.collectives import has_side_effects
    from kiln.passes import PassContext
    from kiln.passes.schedule_blocks import ScheduleBlocks

    graph, inputs = _placed_layer()
    before = graph.run(inputs)
    effects = [n.name for n in graph.compute_nodes() if has_side_effects(n)]
    result = ScheduleBlocks().run(graph, PassContext(target="npu"))
    assert result.modified and result.stats["tasks_after"] < result.stats["tasks_before"], result.stats
    nodes = graph.compute_nodes()
    position = {n: i for i, n in enumerate(nodes)}
    assert all(position[i] < position[n] for n in nodes for i in n.all_input_nodes if i in position)
    assert [n.name for n in nodes if has_side_effects(n)] == effects  # random ops (sdpa) keep their order
    q, k, v = (next(n for n in nodes if n.name == f"int8_linear_default{s}") for s in ("", "_1", "_2"))
    assert position[k] - position[q] <= 2 and position[v] - position[k] <= 2  # q, k, v in one NPU run
    for a, b in zip(graph.run(inputs), before):
        assert torch.equal(a, b)


def test_the_pass_leaves_a_graph_on_one_device_alone():
    import torch

    import kiln

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    cm = kiln.compile(m, (torch.randn(2, 4),), passes=["place", "schedule_blocks"])
    (record,) = [p for p in cm.manifest["programs"]["main"]["passes"] if p["name"] == "schedule_blocks"]
    assert record["modified"] is False and record["stats"]["tasks_before"] == record["stats"]["tasks_after"]
