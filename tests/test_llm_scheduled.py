"""ScheduleBlocks on a chunked prefill: int8 linears on the emulated npu, float work on the cpu, chunks out of order."""
import pytest
import torch
from safetensors.torch import save_file

import kiln
from kiln import zoo
from kiln.errors import KilnError
from kiln.llm import compile_llm
from kiln.llm.hf import KVCacheLM
from kiln.passes.extract_outliers import Int8Quantization
from kiln.passes.schedule_blocks import chain_dag, check_order
from kiln.runtime.chain import IN_ORDER, SCHEDULED

CHUNK, CAPACITY = 8, 32


@pytest.fixture(scope="module")
def llama():
    model, (ids,) = zoo.llama(seq=CAPACITY)
    model.generation_config.eos_token_id = None
    prompts = [ids[:, :n] for n in (9, 20)]
    return model, ids, prompts


@pytest.fixture(scope="module")
def scheduled(llama):
    model, _, prompts = llama
    return compile_llm(model, chunk_size=CHUNK, capacity=CAPACITY, target="npu", schedule="modeled",
                       calibration_prompts=prompts, options=kiln.CompileOptions(int8=Int8Quantization()))


def _chain_field(llm):
    return llm.chunk_graph.entry["chain"]


def test_the_chunk_program_carries_a_schedule_for_every_chunk_count(scheduled):
    chain = _chain_field(scheduled)
    program = scheduled.chunk_graph.entry
    assert sorted(map(int, chain["orders"])) == list(range(1, CAPACITY // CHUNK + 1))
    assert chain["costs"]["source"] == "modeled" and chain["costs"]["sync_us"] > 0
    queues = {t["queue"] for t in program["tasks"]}
    assert queues == {"npu0", "cpu0"}
    carry = {int(i): name for i, name in chain["carry"]}
    for k, orders in chain["orders"].items():
        costs = {t["name"]: 1.0 for t in program["tasks"]}
        check_order(chain_dag(program, carry, int(k), costs), {q: [tuple(x) for x in o] for q, o in orders.items()})
    # overlap pays in the model once there are two chunks
    for k in ("2", "4"):
        span = chain["makespans"][k]
        assert span["out_of_order_us"] < span["in_order_us"], span


@pytest.mark.parametrize("n", [3, 8, 9, 17, 32])
def test_out_of_order_prefill_is_bitwise_the_in_order_one(scheduled, llama, n):
    _, ids, _ = llama
    prompt = ids[:, :n]
    assert scheduled.prefill_order == SCHEDULED
    ooo = scheduled.prefill(prompt)
    scheduled.prefill_order = IN_ORDER
    try:
        ino = scheduled.prefill(prompt)
    finally:
        scheduled.prefill_order = SCHEDULED
    chain, scheduled.chain = scheduled.chain, None  # the plain chunk loop (Program.run per chunk)
    try:
        loop = scheduled.prefill(prompt)
    finally:
        scheduled.chain = chain
    for a, b, c in zip(ooo, ino, loop):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)


def test_int8_prefill_tracks_fp32_and_greedy_decoding_runs(scheduled, llama):
    model, ids, _ = llama
    prompt = ids[:, :20]
    lm = KVCacheLM(model)
    with torch.no_grad():
        eager, *_ = lm(prompt, torch.tensor(0), *lm.empty_cache(1, CAPACITY))
    logits, _, _ = scheduled.prefill(prompt)
    assert logits.argmax(-1).equal(eager[:, -1].argmax(-1))  # int8: the top token, not fp32 tolerance
    cos = torch.nn.functional.cosine_similarity(logits, eager[:, -1]).item()
    assert cos > 0.99, cos
    assert scheduled.generate(prompt, 4).shape == (1, 24)


def test_the_trace_shows_npu_work_of_one_chunk_beside_cpu_work_of_another(scheduled, llama):
    _, ids, _ = llama
    with scheduled.model.tracing() as trace:
        scheduled.prefill(ids[:, :CAPACITY])
    spans = {}
    for _, task, queue, start, end in trace.events:
        name, step = task.rsplit("@", 1)
        spans[(int(step), name)] = (start, end, queue)
    program = scheduled.chunk_graph.entry
    carry = {int(i): name for i, name in _chain_field(scheduled)["carry"]}
    dag = chain_dag(program, carry, CAPACITY // CHUNK, {t["name"]: 1.0 for t in program["tasks"]})
    assert set(spans) == set(dag)
    for a, b in dag.edges:
        assert spans[b][0] >= spans[a][1], (a, b)
    # the stored order interleaves chunks on the npu: a later chunk's int8 work before an earlier one's is done
    steps = [i for i, _ in _chain_field(scheduled)["orders"][str(CAPACITY // CHUNK)]["npu0"]]
    assert steps != sorted(steps), steps


def test_a_measured_schedule_with_pinned_queues(llama):
    model, ids, _ = llama
    llm = compile_llm(model, chunk_size=CHUNK, capacity=CAPACITY, target="npu", schedule="measured",
                      queue_cores={"npu0": [0], "cpu0": [1]}, options=kiln.CompileOptions(int8=Int8Quantization()))
    chain = _chain_field(llm)
    assert chain["costs"]["source"] == "measured"
    assert all(us > 0 for us in chain["costs"]["us"].values())
    assert llm.chain.queue_cores == {"npu0": (0,), "cpu0": (1,)}
    a = llm.prefill(ids[:, :17])
    llm.prefill_order = IN_ORDER
    b = llm.prefill(ids[:, :17])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_schedule_survives_save_and_load_in_a_fresh_process(scheduled, llama, tmp_path, fresh_python):
    _, ids, _ = llama
    scheduled.save(tmp_path / "llm")
    prompt = ids[:, :19]
    save_file({"ids": prompt, "logits": scheduled.prefill(prompt)[0]}, str(tmp_path / "io.safetensors"))
    out = fresh_python(f"""
        import kiln
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / 'io.safetensors')!r})
        llm = kiln.load({str(tmp_path / 'llm')!r})
        assert llm.prefill_order == "scheduled" and llm.chain.max_steps == {CAPACITY // CHUNK}
        assert torch.equal(llm.prefill(io["ids"])[0], io["logits"])
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_bad_schedule_options_are_refused(llama):
    model, *_ = llama
    with pytest.raises(KilnError, match="schedule must be one of"):
        compile_llm(model, chunk_size=CHUNK, capacity=CAPACITY, schedule="fast")
    with pytest.raises(KilnError, match="give chunk_size too"):
        compile_llm(model, capacity=CAPACITY, schedule="modeled")
    with pytest.raises(KilnError, match="has none"):
        compile_llm(model, chunk_size=CHUNK, capacity=CAPACITY, target="cpu", schedule="modeled")
    with pytest.raises(KilnError, match="calibration_prompts\\[0\\] must be token ids"):
        compile_llm(model, chunk_size=CHUNK, capacity=CAPACITY, calibration_prompts=[torch.randn(1, 4)])
    with pytest.raises(KilnError, match="instead of options.calibration"):
        compile_llm(model, chunk_size=CHUNK, capacity=CAPACITY,
                    options=kiln.CompileOptions(calibration=[(torch.zeros(1, 8, dtype=torch.long),)]))


def test_kiln_inspect_writes_both_orders_timelines_predicted_and_measured(scheduled, tmp_path, capsys):
    import json

    from jsonschema import validate

    from kiln.cli import main
    from tests.runtime.test_scheduler import TRACE_EVENT_SCHEMA

    scheduled.save(tmp_path / "llm")
    assert main(["inspect", str(tmp_path / "llm"), "--timeline", str(tmp_path / "tl"), "--chunks", "3"]) == 0
    text = capsys.readouterr().out
    assert "predicted out-of-order (modeled costs)" in text and "measured in-order (this machine)" in text
    assert "modeled, not measured" in text
    for name in ("predicted-in-order", "predicted-out-of-order", "measured-in-order", "measured-out-of-order"):
        trace = json.loads((tmp_path / "tl" / f"{name}.json").read_text())
        validate(trace, TRACE_EVENT_SCHEMA)
        steps = {e["name"].rsplit("@", 1)[1] for e in trace["traceEvents"] if e["ph"] == "X"}
        assert steps == {"0", "1", "2"}, (name, steps)
    predicted = json.loads((tmp_path / "tl" / "predicted-out-of-order.json").read_text())
    assert all(e["cat"] == "modeled" for e in predicted["traceEvents"] if e["ph"] == "X")
    assert main(["inspect", "nope.py:f", "--timeline", str(tmp_path / "x")]) != 0
    assert "--timeline reads a saved artifact" in capsys.readouterr().err
