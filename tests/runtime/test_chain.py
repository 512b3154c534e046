"""Chained runs of one program (kiln.runtime.chain): in order and out of order give bitwise the same results."""
import json

import pytest
import torch
from torch import nn

import kiln
from kiln.errors import ArtifactError, InputMismatchError
from kiln.passes.schedule_blocks import chain_dag, check_order, schedule_chain
from kiln.runtime import CompiledModel, Trace
from kiln.runtime.artifact import place_on_queues
from kiln.runtime.chain import IN_ORDER, SCHEDULED, Chain


class TwoLayers(nn.Module):
    """A chunk-shaped step: per layer a GEMM (queue cpu1 below), then ``frac`` mixing in that layer's carried state;
    a head (its own GEMM and ``frac``) that only the last step runs, as a chunked prefill's LM head."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, s0, s1):
        n0 = torch.frac(self.l0(x) + s0)
        n1 = torch.frac(self.l1(n0) + s1)
        return torch.frac(self.head(n1) * 3), n0, n1 * 0.5


def _eager_chain(m, xs, s0, s1):
    outs = []
    for x in xs:
        y, s0, s1 = m(x, s0, s1)
        outs.append(y)
    return outs, s0, s1


@pytest.fixture(scope="module")
def chained():
    torch.manual_seed(0)
    m = TwoLayers().eval()
    x, s = torch.randn(4, 8), torch.randn(4, 8)
    cm = kiln.compile(m, (x, s, s))
    manifest = json.loads(json.dumps(cm.manifest))
    program = manifest["programs"]["main"]
    gemms = {t["name"]: "cpu1" for t in program["tasks"] if any(w.endswith("weight") for w in t["weights"])}
    assert len(gemms) == 3, [(t["name"], t["weights"]) for t in program["tasks"]]
    place_on_queues(manifest, gemms)
    costs = {t["name"]: (4.0 if t["name"] in gemms else 3.0) for t in program["tasks"]}
    program["chain"] = schedule_chain(program, {1: "s0", 2: "s1"}, 4, costs, cost_source="modeled")
    return m, CompiledModel(kiln.runtime.Artifact(manifest, cm.artifact.weights, cm.artifact.files))


def _steps(k):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 8, generator=g) for _ in range(k)]
    s0, s1 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    return xs, s0, s1, [[x, s0, s1] if i == 0 else [x, None, None] for i, x in enumerate(xs)]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_scheduled_equals_in_order_bitwise_and_eager(chained, k):
    m, cm = chained
    chain = Chain(cm.default_program)
    xs, s0, s1, steps = _steps(k)
    ooo = chain.run(steps, order=SCHEDULED)
    ino = chain.run(steps, order=IN_ORDER)
    assert all(torch.equal(x, y) for x, y in zip(ooo, ino))
    want, w0, w1 = _eager_chain(m, xs, s0, s1)
    torch.testing.assert_close(ooo[0], want[-1])
    torch.testing.assert_close(ooo[1], w0)
    torch.testing.assert_close(ooo[2], w1)


def test_the_trace_shows_every_dependency_respected(chained):
    _, cm = chained
    chain = Chain(cm.default_program, queue_cores={"cpu0": [0], "cpu1": [1]})
    program = cm.manifest["programs"]["main"]
    *_, steps = _steps(4)
    trace = Trace()
    chain.run(steps, order=SCHEDULED, trace=trace)
    spans = {}
    for _, task, queue, start, end in trace.events:
        name, step = task.rsplit("@", 1)
        spans[(int(step), name)] = (start, end, queue)
    dag = chain_dag(program, {1: "s0", 2: "s1"}, 4, {t["name"]: 1.0 for t in program["tasks"]})
    assert set(spans) == set(dag)
    head = [t["name"] for t in program["tasks"] if "p_head_weight" in t["weights"]]
    assert [n for n in spans if n[1] in head] == [(3, head[0])]  # the head runs in the last step only
    for a, b in dag.edges:
        assert spans[b][0] >= spans[a][1], (a, b)
    check_order(dag, chain.orders[4])
    assert {q for *_, q in spans.values()} == {"cpu0", "cpu1"}


def test_bad_calls_are_refused(chained):
    _, cm = chained
    chain = Chain(cm.default_program)
    *_, steps = _steps(5)
    with pytest.raises(InputMismatchError, match="chains of 1..4 steps, not 5"):
        chain.run(steps)
    with pytest.raises(InputMismatchError, match="step 0 lacks inputs"):
        chain.run([[steps[0][0], None, None]])
    with pytest.raises(InputMismatchError, match="queue_cores names queue 'npu7'"):
        Chain(cm.default_program, queue_cores={"npu7": [0]})
    plain = kiln.compile(nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(ArtifactError, match="no field chain"):
        Chain(plain.default_program)


def _first_queue_order(m):
    return m["programs"]["main"]["chain"]["orders"]["2"]


def _swap_two_first(m):  # cpu0 runs step 1's first task before step 0's: it waits on what waits on it
    order = m["programs"]["main"]["chain"]["orders"]["2"]["cpu0"]
    order[0], order[-1] = order[-1], order[0]


@pytest.mark.parametrize("edit, message", [
    (lambda m: _first_queue_order(m)["cpu0"].pop(), "in no queue's order"),
    (lambda m: _first_queue_order(m)["cpu0"].append([0, "nope"]), "is not a task of a 2-step chain"),
    (lambda m: _first_queue_order(m)["cpu1"].append(_first_queue_order(m)["cpu0"].pop()), "runs on queue 'cpu0'"),
    (_swap_two_first, "deadlock"),
    (lambda m: m["programs"]["main"]["chain"]["carry"].append([2, "s0"]), "carried twice"),
    (lambda m: m["programs"]["main"]["chain"]["carry"].append([9, "x"]), "output 9 is not a value"),
    (lambda m: m["programs"]["main"]["chain"]["carry"].__setitem__(0, [1, "nope"]), "'nope' is not an input"),
    (lambda m: m["programs"]["main"]["chain"]["orders"].__setitem__("0", {}), "field programs.main.chain.orders"),
])
def test_a_tampered_chain_is_refused_at_load(chained, tmp_path, no_kernel_loads, rewrite_manifest, edit, message):
    _, cm = chained
    path = cm.save(tmp_path / "chain")
    rewrite_manifest(path, edit)
    with pytest.raises(ArtifactError, match=message):
        kiln.load(path)


def test_the_chain_survives_save_and_load(chained, tmp_path):
    m, cm = chained
    loaded = kiln.load(cm.save(tmp_path / "chain"))
    *_, steps = _steps(3)
    a = Chain(loaded.default_program).run(steps)
    b = Chain(cm.default_program).run(steps, order=IN_ORDER)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_concurrent_chains_on_one_program_finish_and_agree(chained):
    import threading

    _, cm = chained
    chain = Chain(cm.default_program)
    *_, steps = _steps(4)
    want = chain.run(steps, order=IN_ORDER)
    results, errors = [], []

    def call():
        try:
            for _ in range(5):
                results.append(chain.run(steps))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "concurrent chains deadlocked"
    assert not errors and len(results) == 20
    assert all(torch.equal(x, y) for r in results for x, y in zip(r, want))
