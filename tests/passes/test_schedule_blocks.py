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
