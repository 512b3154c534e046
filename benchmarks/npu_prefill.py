"""mllm-NPU prefill end to end: chunked int8 + outlier prefill, in order and out of order, against fp32 eager.

A Llama-style decoder (random weights, fp32) is compiled with
``compile_llm(chunk_size=C, target="npu", schedule=...)`` and
``CompileOptions(int8=Int8Quantization())`` calibrated on prompts: every
linear is an int8 linear on the emulated NPU (queue ``npu0``) plus its
outlier channels in float on the CPU (``cpu0``), beside the CPU's float
attention and norms. Two numbers come out of it, printed apart:

- **modeled** (the npu backend's cost model, a phone's NPU and CPU): the
  prefill's device time in order and in ScheduleBlocks' out-of-order order,
  and a CPU-only float prefill of the same program priced by the same model.
  Every such time is modeled, and printed so.
- **measured here** (this machine's two cores): the emulated NPU queue pinned
  to core 0 and the CPU queue to core 1, one thread each (TVM's pool set to
  one thread with ``TVM_NUM_THREADS=1``, so each queue's work stays on its
  core), the same prompt prefilled in order and out of order, each task's
  order the one stored in the artifact; against PyTorch eager's fp32 prefill
  of the whole prompt on both cores and kiln's float chunked prefill on the
  ``cpu`` target. Interleaved rounds, per-round ratios. The overlap is read
  from the trace: the share of the prefill's wall time when both queues run
  a task at once.

It also checks what it times: in-order and out-of-order logits bitwise equal;
greedy tokens after kiln's float chunked prefill against eager's; the int8
path's top-1 agreement with fp32 over every prompt position (its per-chunk
last rows are the only logits a chunk program computes, so agreement is
taken on the last token of each of several prompts).

    .venv/bin/python benchmarks/npu_prefill.py                       # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/npu_prefill.py --hidden 1024 --prompt 512 --chunk 128
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM loads: each queue's TVM work on its own core
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import kiln  # noqa: E402
from kiln import zoo  # noqa: E402
from kiln.backends.npu import modeled_us  # noqa: E402
from kiln.llm import compile_llm  # noqa: E402
from kiln.llm.hf import KVCacheLM  # noqa: E402
from kiln.passes.extract_outliers import Int8Quantization  # noqa: E402
from kiln.runtime import npu as npu_counters  # noqa: E402
from kiln.runtime.chain import IN_ORDER, SCHEDULED  # noqa: E402
from kiln.timing import machine, paired_speedup, rounds_ms  # noqa: E402

QUEUE_CORES = {"npu0": [0], "cpu0": [1]}


def overlap(trace_events) -> tuple[float, float]:
    """(wall ms, share of it when both queues run a task) over one traced prefill."""
    spans = {}
    for _, _, queue, start, end in trace_events:
        spans.setdefault(queue, []).append((start, end))
    t0 = min(s for v in spans.values() for s, _ in v)
    t1 = max(e for v in spans.values() for _, e in v)
    if len(spans) < 2:
        return (t1 - t0) / 1e6, 0.0
    a, b = (sorted(v) for v in spans.values())
    both, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        both += max(0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return (t1 - t0) / 1e6, both / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens timed")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=320,
                    help="KV cache slots (the prompt and 64 generated tokens by default); every chunk's attention "
                         "spans all of them (static shapes), so a capacity far above the prompt costs attention time")
    ap.add_argument("--schedule", default="measured", choices=["measured", "modeled"],
                    help="the costs ScheduleBlocks orders the chunks by")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    print(machine())
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("this benchmark pins the two queues to two cores; this process has one")
    heads = max(1, args.hidden // 64)
    model, (ids,) = zoo.llama(hidden=args.hidden, layers=args.layers, heads=heads, kv_heads=max(1, heads // 2),
                              vocab=args.vocab, seq=args.capacity)
    model.generation_config.eos_token_id = None
    params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama-style, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {params / 1e6:.0f}M "
          f"parameters, random weights, fp32; prompt {args.prompt} tokens, chunk {args.chunk}, "
          f"capacity {args.capacity}")
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, args.vocab, (1, n), generator=g) for n in (args.chunk + 5, 2 * args.chunk, 40)]
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g)

    int8 = kiln.CompileOptions(int8=Int8Quantization())
    npu = compile_llm(model, chunk_size=args.chunk, capacity=args.capacity, target="npu", schedule=args.schedule,
                      queue_cores=QUEUE_CORES, calibration_prompts=calib, options=int8)
    floats = compile_llm(model, chunk_size=args.chunk, capacity=args.capacity, target="cpu")
    chunks = -(-args.prompt // args.chunk)
    program = npu.chunk_graph.entry
    npu_tasks = sum(t["queue"] == "npu0" for t in program["tasks"])
    print(f"chunk program: {len(program['tasks'])} tasks ({npu_tasks} on npu0, "
          f"{len(program['tasks']) - npu_tasks} on cpu0); schedule from {args.schedule} costs")

    # -- modeled ------------------------------------------------------------------------------------
    span = program["chain"]["makespans"][str(chunks)]
    if args.schedule == "modeled":
        ino, ooo = span["in_order_us"], span["out_of_order_us"]
    else:  # the orders came from measured costs: price both orders with the model too
        from kiln.passes.schedule_blocks import chain_dag, in_order_schedule, list_schedule
        costs = {t["name"]: t["report"]["modeled_us"] for t in program["tasks"]}
        carry = {int(i): n for i, n in program["chain"]["carry"]}
        dag = chain_dag(program, carry, chunks, costs)
        sync = kiln.backends.npu.NpuCost().handoff_us
        ino, ooo = in_order_schedule(dag, program, sync).makespan, list_schedule(dag, sync).makespan
    lm = KVCacheLM(model)
    example = (torch.zeros(1, args.prompt, dtype=torch.int64), torch.tensor(0), *lm.empty_cache(1, args.capacity))
    cpu_only = modeled_us(torch.export.export(lm, example).graph, "cpu")
    print("\nMODELED (cost model: a phone NPU + CPU; not measured)")
    print(f"  prefill of {args.prompt} tokens ({chunks} chunks): in order {ino / 1e3:.2f} ms, out of order "
          f"{ooo / 1e3:.2f} ms = {ooo / ino:.2f}x in order; CPU-only fp32 prefill {cpu_only / 1e3:.2f} ms "
          f"= {cpu_only / ooo:.1f}x the out-of-order NPU prefill")

    # -- measured -----------------------------------------------------------------------------------
    def eager():
        with torch.no_grad():
            return model(prompt, use_cache=False).logits

    def run(order):
        def f():
            npu.prefill_order = order
            return npu.prefill(prompt)
        return f

    contenders = {"eager fp32": eager, "kiln cpu fp32 chunked (TVM on 1 thread)": lambda: floats.prefill(prompt),
                  "kiln npu in-order": run(IN_ORDER), "kiln npu out-of-order": run(SCHEDULED)}
    a, b = run(IN_ORDER)(), run(SCHEDULED)()
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "out-of-order prefill differs from in-order"
    npu_counters.reset()
    times = rounds_ms(contenders, repeat=args.repeat)
    base = times["eager fp32"]
    print(f"\nMEASURED here (npu0 emulated on core 0, cpu0 on core 1, one thread each; eager on both cores; "
          f"median of {args.repeat} interleaved rounds)")
    for name, t in times.items():
        med = sorted(t)[len(t) // 2]
        s, q1, q3 = paired_speedup(base, t)
        print(f"  {name:38s} {med:8.1f} ms   {s:5.2f}x eager [{q1:.2f}-{q3:.2f}]")
    s, q1, q3 = paired_speedup(times["kiln npu in-order"], times["kiln npu out-of-order"])
    print(f"  out-of-order vs in-order: {s:.2f}x [{q1:.2f}-{q3:.2f}]")
    for order in (IN_ORDER, SCHEDULED):
        npu.prefill_order = order
        with npu.model.tracing() as trace:
            npu.prefill(prompt)
        wall, both = overlap(trace.events)
        print(f"  trace, {order:10s}: {wall:.1f} ms, both queues busy {both:.0%} of it")
    stats = npu_counters.stats()
    print(f"  emulated NPU: {stats['builds']} graph builds (modeled {stats['modeled_build_us'] / 1e6:.2f} s), "
          f"{stats['calls']} calls")

    # -- fidelity -----------------------------------------------------------------------------------
    tests = [torch.randint(0, args.vocab, (1, n), generator=g) for n in (17, args.chunk, args.chunk + 1, 150)]
    agree = 0
    for p in tests:
        with torch.no_grad():
            ref = model(p, use_cache=False).logits[:, -1]
        agree += int(npu.prefill(p)[0].argmax(-1).equal(ref.argmax(-1)))
    ref_tokens = model.generate(prompt[:, :40], max_new_tokens=8, do_sample=False)
    same = torch.equal(floats.generate(prompt[:, :40], 8), ref_tokens)
    print(f"\nfidelity: int8 + outliers top-1 = fp32 on {agree}/{len(tests)} prompts' last tokens; float chunked "
          f"greedy tokens {'identical to' if same else 'DIFFER from'} eager's (8 tokens after a 40-token prompt)")


if __name__ == "__main__":
    main()
