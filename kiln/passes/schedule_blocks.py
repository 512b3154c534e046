"""ScheduleBlocks: blocks of one device's work, and an out-of-order order for chained runs of them (mllm-NPU).

Two halves. **On the graph** (the ``schedule_blocks`` pass, after
``place``): the partitioner cuts a task wherever the node order changes
placement or queue, so a layer whose q, k and v projections sit between
float ops (a reshape, RoPE) becomes three NPU tasks with CPU tasks between
them. The pass reorders the nodes, keeping every dependency, so that ready
nodes of the device just used come first: a topological order that
greedily extends the current run (ties in the traced order). Each layer
then has one NPU task per group of independent int8 linears (q/k/v,
gate/up), and fewer hand-offs between queues. Nodes with side effects
(collectives, random ops) keep their relative order; a graph on one backend
and queue is left as it is.

**On the program** (after lowering):

A chunked prefill runs one static chunk program ``k`` times, each run (a
*step*) reading the KV values the step before wrote: a *chain*. Run in
order, chunk *i+1* waits for the whole of chunk *i*; but chunk *i+1*'s
first NPU linears need only its own input and chunk *i*'s layer-0 KV, so
they can run while the CPU still does chunk *i*'s float attention. This
pass builds the DAG of every ``(step, task)`` of ``k`` steps with its true
dependencies (:func:`kiln.ir.chain.chain_dependencies`: a task's ``after``
within its step; a carried input of step *i* on the task of step *i-1* that
produced it) on networkx, and schedules
it with a critical-path list scheduler: a task's priority is its upward rank
(its cost plus the longest path to the end, hand-offs between queues
included), each step the ready task of highest rank goes to its queue at
the earliest time its queue and inputs allow. The result is one task order
per queue, for every chain length ``1 .. max_steps``; the runtime
(:mod:`kiln.runtime.chain`) runs exactly that order, one worker per queue,
so the results are those of in-order execution (every task reads only values
its dependencies wrote).

A step before the last runs only the tasks the next step reads
(:func:`kiln.ir.chain.carried_tasks`: no LM head for a chunk but the last).

Needs before it: a lowered program (its tasks with their queues, the
partitions the ``npu`` placement split off) and each task's cost in
microseconds on its queue, from the backends' cost model (modeled) or from
timing the loaded kernels (measured): the caller says which, and the
manifest records it. It runs on a program, after lowering, not on the graph
IR: the tasks it orders exist only once the graph is partitioned.

The modeled makespans it reports (in order and out of order) come from the
costs it was given: when those are modeled, so is every time it prints.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import networkx as nx

from ..errors import KilnError
from ..ir import Graph
from ..ir.chain import chain_dependencies
from ..ir.collectives import has_side_effects
from .base import Pass, PassContext, PassResult, register_pass

Step = tuple[int, str]  # (step index, task name)


@register_pass
class ScheduleBlocks(Pass):
    """Reorder a placed graph's nodes so each device's ready work forms one run (one task); stats: ``tasks_before``,
    ``tasks_after`` (runs of one placement and queue in node order)."""

    name = "schedule_blocks"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nodes = graph.compute_nodes()
        key = {n: (graph.meta(n).placement, graph.meta(n).queue) for n in nodes}
        before = _runs([key[n] for n in nodes])
        if len(set(key.values())) < 2:
            return PassResult(False, {"tasks_before": before, "tasks_after": before})
        index = {n: i for i, n in enumerate(nodes)}
        # nodes with side effects (collectives, random ops) keep their relative order: each waits for the last
        effects = [n for n in nodes if has_side_effects(n)]
        extra = {b: a for a, b in zip(effects, effects[1:])}
        users = {n: list(n.users) for n in nodes}
        for b, a in extra.items():
            users[a].append(b)
        waiting = {n: sum(1 for i in n.all_input_nodes if i in index) + (n in extra) for n in nodes}
        ready = [n for n in nodes if waiting[n] == 0]
        order: list = []
        while ready:
            current = key[order[-1]] if order else None
            same = [n for n in ready if key[n] == current]
            n = min(same or ready, key=index.__getitem__)
            ready.remove(n)
            order.append(n)
            for u in users[n]:
                if u in waiting:
                    waiting[u] -= 1
                    if waiting[u] == 0:
                        ready.append(u)
        after = _runs([key[n] for n in order])
        if order == nodes or after >= before:
            return PassResult(False, {"tasks_before": before, "tasks_after": before})
        anchor = nodes[0].prev  # the last node before the compute nodes (a placeholder)
        for n in order:
            anchor.append(n)
            anchor = n
        graph.fx.lint()
        return PassResult(True, {"tasks_before": before, "tasks_after": after})


def _runs(keys: list) -> int:
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])


@dataclass
class Schedule:
    """Per-queue task orders of a chain, with the start and end times the costs give (microseconds)."""

    orders: dict[str, list[Step]]
    start: dict[Step, float]
    end: dict[Step, float]

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    def to_json(self) -> dict[str, list[list]]:
        return {q: [[i, name] for i, name in order] for q, order in self.orders.items()}

    def to_trace(self, label: str) -> dict:
        """The schedule as Chrome trace-event JSON (Perfetto), one thread per queue, every event marked modeled.

        ``label`` names the order ("in-order", "out-of-order"); it becomes the process name.
        """
        queues = list(self.orders)
        meta = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"{label} (modeled)"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": q}}
                 for t, q in enumerate(queues)]
        events = [{"name": f"{name}@{i}", "cat": "modeled", "ph": "X", "ts": self.start[(i, name)],
                   "dur": self.end[(i, name)] - self.start[(i, name)], "pid": 0, "tid": t,
                   "args": {"queue": q, "step": i, "modeled": True}}
                  for t, q in enumerate(queues) for i, name in self.orders[q]]
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}


def carried_producers(program: dict, carry: Mapping[int, str]) -> dict[str, str]:
    """For each carried input name: the task of a step that produces the output feeding it in the next step."""
    producer = {o: t["name"] for t in program["tasks"] for o in t["outputs"]}
    inputs = {i["name"] for i in program["signature"]["inputs"]}
    outputs = program["outputs"]
    found = {}
    for index, name in carry.items():
        if not 0 <= index < len(outputs) or "value" not in outputs[index]:
            raise KilnError(f"chain carry: output {index} of the program is not a computed value")
        if name not in inputs:
            raise KilnError(f"chain carry: output {index} feeds {name!r}, which is not an input of the program")
        value = outputs[index]["value"]
        if value not in producer:
            raise KilnError(f"chain carry: output {index} ({value!r}) is not computed by a task (an input or a "
                            "weight passed through); a chain carries only what a step computes")
        found[name] = producer[value]
    return found


def chain_dag(program: dict, carry: Mapping[int, str], steps: int, costs: Mapping[str, float]) -> nx.DiGraph:
    """The DAG of ``steps`` chained runs: nodes ``(step, task)`` with ``queue`` and ``cost``; edges are dependencies."""
    if steps < 1:
        raise KilnError(f"a chain has at least one step; got {steps}")
    carried_producers(program, carry)  # refuses a carry chain_dependencies cannot follow
    missing = [t["name"] for t in program["tasks"] if t["name"] not in costs]
    if missing:
        raise KilnError(f"ScheduleBlocks needs a cost for every task; none for {', '.join(missing)}")
    queue = {t["name"]: t["queue"] for t in program["tasks"]}
    dag = nx.DiGraph()
    for n, deps in chain_dependencies(program["tasks"], program["outputs"], carry.items(), steps).items():
        dag.add_node(n, queue=queue[n[1]], cost=float(costs[n[1]]))
        for d in deps:
            dag.add_edge(d, n)
    return dag


def _handoff(dag: nx.DiGraph, a: Step, b: Step, sync_us: float) -> float:
    return sync_us if dag.nodes[a]["queue"] != dag.nodes[b]["queue"] else 0.0


def upward_rank(dag: nx.DiGraph, sync_us: float = 0.0) -> dict[Step, float]:
    """Each task's cost plus the longest path from it to the end (hand-offs between queues cost ``sync_us``)."""
    rank: dict[Step, float] = {}
    for n in reversed(list(nx.topological_sort(dag))):
        tail = max((_handoff(dag, n, s, sync_us) + rank[s] for s in dag.successors(n)), default=0.0)
        rank[n] = dag.nodes[n]["cost"] + tail
    return rank


def list_schedule(dag: nx.DiGraph, sync_us: float = 0.0) -> Schedule:
    """Critical-path list scheduling: the ready task of highest upward rank goes next, at its earliest start."""
    rank = upward_rank(dag, sync_us)
    waiting = {n: dag.in_degree(n) for n in dag}
    ready = [n for n, d in waiting.items() if d == 0]
    free: dict[str, float] = {}
    start: dict[Step, float] = {}
    end: dict[Step, float] = {}
    orders: dict[str, list[Step]] = {}
    while ready:
        # highest rank first; ties: earlier step, then name (deterministic)
        n = max(ready, key=lambda m: (rank[m], -m[0], m[1]))
        ready.remove(n)
        q = dag.nodes[n]["queue"]
        inputs_at = max((end[p] + _handoff(dag, p, n, sync_us) for p in dag.predecessors(n)), default=0.0)
        start[n] = max(free.get(q, 0.0), inputs_at)
        end[n] = free[q] = start[n] + dag.nodes[n]["cost"]
        orders.setdefault(q, []).append(n)
        for s in dag.successors(n):
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.append(s)
    return Schedule(orders, start, end)


def in_order_schedule(dag: nx.DiGraph, program: dict, sync_us: float = 0.0) -> Schedule:
    """Every task after the one before it: step by step, each in the program's task order (no overlap)."""
    steps = 1 + max(i for i, _ in dag)
    sequence = [(i, t["name"]) for i in range(steps) for t in program["tasks"] if (i, t["name"]) in dag]
    start, end, orders = {}, {}, {}
    clock, previous = 0.0, None
    for n in sequence:
        if previous is not None:
            clock += _handoff(dag, previous, n, sync_us)
        start[n] = clock
        clock = end[n] = clock + dag.nodes[n]["cost"]
        orders.setdefault(dag.nodes[n]["queue"], []).append(n)
        previous = n
    return Schedule(orders, start, end)


def schedule_chain(program: dict, carry: Mapping[int, str], max_steps: int, costs: Mapping[str, float], *,
                   cost_source: str, sync_us: float = 0.0) -> dict:
    """The ``chain`` field of a program entry: its carry, and an out-of-order order for every length ``1..max_steps``.

    ``cost_source`` says where ``costs`` came from ("modeled" or "measured");
    the modeled makespans are recorded beside each order, in and out of order.
    """
    if cost_source not in ("modeled", "measured"):
        raise KilnError(f"cost_source must be 'modeled' or 'measured', not {cost_source!r}")
    orders, makespans = {}, {}
    for k in range(1, max_steps + 1):
        dag = chain_dag(program, carry, k, costs)
        ooo = list_schedule(dag, sync_us)
        ino = in_order_schedule(dag, program, sync_us)
        orders[str(k)] = ooo.to_json()
        makespans[str(k)] = {"in_order_us": round(ino.makespan, 3), "out_of_order_us": round(ooo.makespan, 3)}
    return {
        "carry": [[i, name] for i, name in sorted(carry.items())],
        "orders": orders,
        "costs": {"source": cost_source, "sync_us": sync_us, "us": {n: round(float(c), 3) for n, c in costs.items()}},
        "makespans": makespans,
    }


def check_order(dag: nx.DiGraph, orders: Mapping[str, list]) -> None:
    """Raise KilnError unless ``orders`` runs every task once, each on its queue, after all its dependencies.

    A task's dependencies must come earlier in its own queue's order or in
    another queue's (no order may wait on a task later in the same queue).
    """
    seen: dict[Step, tuple[str, int]] = {}
    for q, order in orders.items():
        for pos, (i, name) in enumerate(order):
            n = (int(i), name)
            if n not in dag:
                raise KilnError(f"order of queue {q}: {n} is not a task of the chain")
            if n in seen:
                raise KilnError(f"order: {n} runs twice")
            if dag.nodes[n]["queue"] != q:
                raise KilnError(f"order: {n} belongs on queue {dag.nodes[n]['queue']}, not {q}")
            seen[n] = (q, pos)
    if len(seen) != len(dag):
        raise KilnError(f"order: {len(dag) - len(seen)} tasks of the chain never run")
    # a deadlock-free order: the DAG plus each queue's sequence edges must stay acyclic
    g = nx.DiGraph(dag.edges)
    g.add_nodes_from(dag)
    for order in orders.values():
        g.add_edges_from(((int(a[0]), a[1]), (int(b[0]), b[1])) for a, b in zip(order, order[1:]))
    if not nx.is_directed_acyclic_graph(g):
        raise KilnError("order: a queue's order waits on a task that waits on it (a deadlock)")
