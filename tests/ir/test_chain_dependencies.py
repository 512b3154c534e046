"""kiln.ir.chain.chain_dependencies: the one rule ScheduleBlocks, the runtime's Chain and the manifest check share."""
from __future__ import annotations

from kiln.ir.chain import chain_dependencies

# embed reads the state mlp carries, attn the KV it carries itself; head runs in the last step only
TASKS = [
    {"name": "embed", "inputs": ["x", "state"], "outputs": ["h"], "after": []},
    {"name": "attn", "inputs": ["h", "kv"], "outputs": ["a", "kv_out"], "after": ["embed"]},
    {"name": "mlp", "inputs": ["a"], "outputs": ["m", "state_out"], "after": ["attn"]},
    {"name": "head", "inputs": ["m"], "outputs": ["logits"], "after": ["mlp"]},
]
OUTPUTS = [{"value": "logits"}, {"value": "kv_out"}, {"value": "state_out"}]
CARRY = [(1, "kv"), (2, "state")]


def test_the_dependencies_of_a_three_step_chain():
    expected = {
        (0, "embed"): [],
        (0, "attn"): [(0, "embed")],
        (0, "mlp"): [(0, "attn")],
        (1, "embed"): [(0, "mlp")],
        (1, "attn"): [(1, "embed"), (0, "attn")],
        (1, "mlp"): [(1, "attn")],
        (2, "embed"): [(1, "mlp")],
        (2, "attn"): [(2, "embed"), (1, "attn")],
        (2, "mlp"): [(2, "attn")],
        (2, "head"): [(2, "mlp")],
    }
    deps = chain_dependencies(TASKS, OUTPUTS, CARRY, 3)
    assert list(deps.items()) == list(expected.items())  # the keys step by step, each step in program order


def test_one_step_runs_every_task_on_its_after_only():
    assert chain_dependencies(TASKS, OUTPUTS, CARRY, 1) == {
        (0, "embed"): [], (0, "attn"): [(0, "embed")], (0, "mlp"): [(0, "attn")], (0, "head"): [(0, "mlp")]}


def test_a_step_before_the_last_runs_only_what_the_carry_needs():
    # carrying only the KV: mlp computes nothing the next step reads, so only the last step runs it
    deps = chain_dependencies(TASKS, OUTPUTS, [(1, "kv")], 2)
    assert list(deps) == [(0, "embed"), (0, "attn"), (1, "embed"), (1, "attn"), (1, "mlp"), (1, "head")]
    assert deps[(1, "embed")] == []
