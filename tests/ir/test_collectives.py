"""Collectives as graph nodes: verifier, JSON form, clean-up passes, role "comm", the torch backend and runtime.

One-rank gloo groups in this process cover the compiler side; a two-rank run
(spawned processes, gloo) checks that a compiled row-parallel linear's
all-reduce gives eager's result on every rank.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch import nn

import kiln
from kiln.errors import ArtifactError
from kiln.ir import trace
from kiln.ir.collectives import COLLECTIVES, has_side_effects, is_collective, process_group_names
from kiln.ir.serialize import graph_from_json, graph_to_json, op_refusal, resolve_target
from kiln.passes import PassContext, PassManager

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo group (in-memory store) for this module's tests."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class RowParallel(nn.Module):
    """One rank's shard of a row-parallel linear: a partial product, all-reduced, then an activation."""

    def __init__(self, d_in=16, d_out=8):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        partial = self.proj(x)
        total = funcol.all_reduce(partial, "sum", dist.group.WORLD)
        return torch.relu(total) * 2


class ReducesWeight(nn.Module):
    """An all-reduce of a weight alone: constant folding must leave it to run time."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return x + funcol.all_reduce(self.w, "sum", dist.group.WORLD)


def cleanup(graph):
    return PassManager(["remove_trace_asserts", "eliminate_dead_code", "fold_constants"]).run(graph, PassContext())


def test_every_admitted_collective_is_functional():
    assert {op._opname for op in COLLECTIVES} >= {"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
                                                    "all_to_all_single", "wait_tensor"}
    for op in COLLECTIVES:
        assert op_refusal(op) is None, op
        assert resolve_target(str(op)) is op


def test_other_c10d_functional_ops_are_refused():
    coalesced = torch.ops._c10d_functional.all_reduce_coalesced.default
    assert "collectives kiln admits" in op_refusal(coalesced)
    with pytest.raises(ArtifactError, match="all_reduce_coalesced"):
        resolve_target("_c10d_functional.all_reduce_coalesced.default")


def test_trace_verify_and_json_round_trip(group):
    torch.manual_seed(0)
    m, x = RowParallel().eval(), torch.randn(4, 16)
    g = trace(m, (x,))
    g.verify()
    targets = [n.target for n in g.compute_nodes()]
    assert ALL_REDUCE in targets and WAIT in targets
    assert process_group_names(g.gm) == [group.group_name]
    gm = graph_from_json(graph_to_json(g.gm))
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == targets


def test_dead_collective_survives_dead_code_elimination(group):
    torch.manual_seed(0)
    m, x = RowParallel().eval(), torch.randn(4, 16)
    g = trace(m, (x,))
    relu = next(n for n in g.compute_nodes() if n.target == torch.ops.aten.relu.default)
    with g.fx.inserting_after(relu):
        unused = g.fx.call_function(ALL_REDUCE, (relu, "sum", group.group_name))
    with g.fx.inserting_after(unused):
        waited = g.fx.call_function(WAIT, (unused,))
        dead_exp = g.fx.call_function(torch.ops.aten.exp.default, (relu,))
    g.propagate_types()
    assert has_side_effects(unused) and has_side_effects(waited) and not has_side_effects(dead_exp)
    cleanup(g)
    names = {n.name for n in g.compute_nodes()}
    assert {unused.name, waited.name} <= names  # every rank of the group waits for it
    assert dead_exp.name not in names
    torch.testing.assert_close(g(x), m(x))


def test_collective_of_a_weight_is_not_folded(group):
    torch.manual_seed(0)
    m, x = ReducesWeight().eval(), torch.randn(8)
    g = trace(m, (x,))
    records = cleanup(g)
    assert next(r for r in records if r.name == "fold_constants").stats["folded"] == 0
    assert ALL_REDUCE in [n.target for n in g.compute_nodes()]
    torch.testing.assert_close(g(x), m(x))


@pytest.mark.parametrize("target", ["cpu", "torch"])
def test_compile_marks_comm_runs_on_torch_and_reloads(group, target, tmp_path):
    torch.manual_seed(0)
    m, x = RowParallel().eval(), torch.randn(4, 16)
    compiled = kiln.compile(m, (x,), target=target)
    torch.testing.assert_close(compiled(x), m(x), rtol=1.3e-6, atol=1e-5)
    task = next(t for t in compiled.manifest["programs"]["main"]["tasks"]
                if any("_c10d_functional.all_reduce" in op for op in t["report"].get("ops", ())))
    assert task["backend"] == "torch"
    reloaded = kiln.load(compiled.save(tmp_path / "a"))
    torch.testing.assert_close(reloaded(x), m(x), rtol=1.3e-6, atol=1e-5)


def test_collectives_get_role_comm(group):
    torch.manual_seed(0)
    m, x = RowParallel().eval(), torch.randn(4, 16)
    g = trace(m, (x,))
    (record,) = PassManager(["annotate_regions"]).run(g, PassContext())
    roles = {n.target: g.meta(n).role for n in g.compute_nodes() if is_collective(n.target)}
    assert roles == {ALL_REDUCE: "comm", WAIT: "comm"}
    assert record.stats["comm"] == 2
    assert "role=comm" in g.text()


def test_running_without_the_process_group_names_it(group, tmp_path):
    torch.manual_seed(0)
    m, x = RowParallel().eval(), torch.randn(4, 16)
    path = kiln.compile(m, (x,), target="torch").save(tmp_path / "a")
    code = ("import sys, torch, kiln\n"
            "from kiln.errors import ProcessGroupError\n"
            f"m = kiln.load({str(path)!r})\n"
            "try:\n    m(torch.randn(4, 16))\n"
            "except ProcessGroupError as e:\n    print(e); sys.exit(3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr
    assert f"process group(s) {group.group_name!r}" in out.stdout and "init_process_group" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = nn.Linear(16 * world, 8, bias=False)
        x = torch.randn(4, 16 * world)
        expected = torch.relu(full(x)) * 2
        shard = RowParallel(16, 8).eval()
        with torch.no_grad():
            shard.proj.weight.copy_(full.weight[:, rank * 16:(rank + 1) * 16])
        x_shard = x[:, rank * 16:(rank + 1) * 16].contiguous()
        compiled = kiln.compile(shard, (x_shard,), target="cpu")
        got = compiled(x_shard)
        torch.save({"got": got, "expected": expected}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_all_reduce_equals_the_unsharded_eager(tmp_path):
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["got"], result["expected"], rtol=1.3e-6, atol=1e-5)
