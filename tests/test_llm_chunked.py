"""Chunked prefill: one static chunk program run ceil(n/C) times equals the bucket path and eager transformers.

Logits and caches are compared with ``torch.testing.assert_close``'s fp32
defaults (rtol 1.3e-6, atol 1e-5): chunk ``i`` computes the same attention as
the whole prompt at once, over the same masked capacity, so sums differ only
in order (GEMMs over 12 rows instead of 64). Greedy tokens must be equal.
``CHUNK`` = 12 does not divide ``CAPACITY`` = 64, so a prompt at the capacity
limit has a padded first chunk too.
"""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from kiln import zoo
from kiln.errors import ArtifactError, InputMismatchError, KilnError, PassError
from kiln.ir.tracing import trace
from kiln.llm import compile_llm
from kiln.llm.hf import KVCacheLM, LayerwiseKVCacheLM
from kiln.passes import PassContext, PassManager
from kiln.passes.chunk_prefill import ChunkPrefill
from kiln.runtime import CompiledModel
from kiln.runtime.artifact import Artifact
from kiln.runtime.manifest import check_consistency

CHUNK = 12
CAPACITY = 64
# under one chunk, exactly one, exact multiples, one over a multiple (twice), the capacity limit and one below
LENGTHS = (5, 12, 24, 48, 13, 25, 63, 64)
NEW_TOKENS = 10


def _model(name: str):
    model, (ids,) = zoo.MODELS[name](seq=CAPACITY)
    model.generation_config.eos_token_id = None  # HF would stop at EOS; CompiledLLM generates exactly N tokens
    return model, ids


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    """(model, ids, chunked LLM, bucketed LLM): the same model compiled both ways."""
    model, ids = _model(request.param)
    chunked = compile_llm(model, chunk_size=CHUNK, capacity=CAPACITY)
    bucketed = compile_llm(model, prefill_buckets=(16, CAPACITY), capacity=CAPACITY)
    return model, ids, chunked, bucketed


@pytest.mark.parametrize("n", LENGTHS)
def test_chunked_prefill_equals_buckets_and_eager(pair, n):
    model, ids, chunked, bucketed = pair
    prompt = ids[:, :n]
    logits, k, v = chunked.prefill(prompt)
    ref_logits, ref_k, ref_v = bucketed.prefill(prompt)
    with torch.no_grad():
        eager = model(prompt).logits[:, -1]
    assert logits.shape == eager.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(logits, eager)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(k, ref_k)
    torch.testing.assert_close(v, ref_v)
    assert k.shape == chunked.cache_shape
    assert not k[:, :, :, n:].any() and not v[:, :, :, n:].any()  # the padding is written nowhere


def test_chunks_of_a_prompt_cover_it_with_less_than_one_chunk_of_padding(pair):
    _, _, chunked, _ = pair
    for n in range(1, CAPACITY + 1):
        starts = chunked.chunk_starts(n)
        assert len(starts) == -(-n // CHUNK)
        assert 1 - CHUNK <= starts[0] <= 0 and -starts[0] < CHUNK  # all padding in the first chunk, < one chunk
        assert starts[-1] + CHUNK == n  # the last chunk ends at the prompt's last token
        assert all(b - a == CHUNK for a, b in zip(starts, starts[1:]))
        assert all(s in chunked.chunk_graph.controls["start_pos"].allowed for s in starts)


@pytest.mark.parametrize("n", [5, 12, 25, 50])
def test_greedy_tokens_after_chunked_prefill_equal_unchunked_and_hf(pair, n):
    model, ids, chunked, bucketed = pair
    prompt = ids[:, :n]
    got = chunked.generate(prompt, NEW_TOKENS)
    torch.testing.assert_close(got, bucketed.generate(prompt, NEW_TOKENS), rtol=0, atol=0)
    torch.testing.assert_close(got, model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False), rtol=0, atol=0)


def test_the_artifact_holds_one_chunk_program_and_its_carried_state(pair, tmp_path):
    model, _, chunked, _ = pair
    layers = model.config.num_hidden_layers
    path = chunked.save(tmp_path / "llm")
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["programs"]) == ["decode", f"prefill_chunk_{CHUNK}"]
    keys, values = [f"k_new_{l}" for l in range(layers)], [f"v_new_{l}" for l in range(layers)]
    assert manifest["llm"] == {
        "prefill": {}, "decode": "decode",
        "chunk": {"size": CHUNK, "program": f"prefill_chunk_{CHUNK}", "outputs": ["logits", *keys, *values],
                  "carry": {**{f"k_new_{l}": f"k_cache_{l}" for l in range(layers)},
                            **{f"v_new_{l}": f"v_cache_{l}" for l in range(layers)}}}}
    program = manifest["programs"][f"prefill_chunk_{CHUNK}"]
    names = [i["name"] for i in program["signature"]["inputs"]]
    assert names == ["input_ids", *[f"k_cache_{l}" for l in range(layers)], *[f"v_cache_{l}" for l in range(layers)]]
    assert program["signature"]["inputs"][0]["shape"] == [1, CHUNK]
    assert all(i["shape"] == [1, model.config.num_key_value_heads, CAPACITY, 16] for i in
               program["signature"]["inputs"][1:])
    assert len(program["outputs"]) == 1 + 2 * layers
    (check,) = [p for p in program["passes"] if p["name"] == "chunk_prefill"]
    assert check["stats"] | {"static_nodes": 0} == {"chunk_size": CHUNK, "layers": layers, "static_nodes": 0,
                                                    "cache_inputs": 2 * layers, "cache_outputs": 2 * layers,
                                                    "ops_joining_layers": 0}
    ops = {n["op"] for t in program["tasks"] for n in t["report"].get("nodes", [])} | \
        {op for t in program["tasks"] for op in t["report"].get("ops", [])}
    assert not {"aten.stack.default", "aten.unbind.int"} & ops, sorted(ops)  # (cat is RoPE's rotate_half)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    gemms = [g["gemm"] for t in program["tasks"] for g in t["report"].get("gemm_kernels", [])]
    assert f"linear [1x{hidden}] x [{hidden}x{vocab}]" in gemms, gemms  # each chunk's LM head on its last row only


def test_saved_chunked_llm_runs_in_a_fresh_process_without_the_compiler(pair, tmp_path, fresh_python):
    model, ids, chunked, _ = pair
    chunked.save(tmp_path / "llm")
    prompt = ids[:, :CHUNK + 1]
    save_file({"ids": prompt, "logits": chunked.prefill(prompt)[0],
               "expected": model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)},
              str(tmp_path / "io.safetensors"))
    out = fresh_python(f"""
        import sys
        import kiln
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / 'io.safetensors')!r})
        llm = kiln.load({str(tmp_path / 'llm')!r})
        assert type(llm).__name__ == "CompiledLLM" and llm.chunk_size == {CHUNK} and llm.buckets == [], llm
        assert llm.chunk_graph.name == "prefill_chunk_{CHUNK}"
        torch.testing.assert_close(llm.prefill(io["ids"])[0], io["logits"], rtol=0, atol=0)
        assert torch.equal(llm.generate(io["ids"], {NEW_TOKENS}), io["expected"])
        leaked = [m for m in sys.modules if m.startswith(("kiln.passes", "kiln.api", "kiln.backends", "kiln.ir.tracing",
                                                          "kiln.llm.compile", "kiln.llm.hf", "kiln.zoo", "transformers"))]
        assert not leaked, leaked
        print("ok")
    """)
    assert out.strip() == "ok"


def test_layerwise_wrapper_equals_the_stacked_one():
    model, ids = _model("llama")
    stacked, layerwise = KVCacheLM(model), LayerwiseKVCacheLM(model)
    k, v = stacked.empty_cache(1, CAPACITY)
    kl, vl = layerwise.empty_cache(1, CAPACITY)
    with torch.no_grad():
        for start, length in [(-3, CHUNK), (9, CHUNK), (21, 1)]:  # a padded first chunk, a second, a decode step
            chunk = ids[:, max(start, 0):start + length]
            chunk = torch.cat([torch.zeros(1, length - chunk.shape[1], dtype=torch.long), chunk], dim=1)
            logits, k, v = stacked(chunk, torch.tensor(start), k, v)
            logits_l, kl, vl = layerwise(chunk, torch.tensor(start), kl, vl)
            assert torch.equal(logits, logits_l)
            assert torch.equal(k, torch.stack(kl)) and torch.equal(v, torch.stack(vl))


def _checked(module, chunk: int = CHUNK, **options):
    lm = module if isinstance(module, LayerwiseKVCacheLM) else LayerwiseKVCacheLM(module)
    k, v = lm.empty_cache(1, CAPACITY)
    graph = trace(lm, (torch.zeros(1, chunk, dtype=torch.long), torch.tensor(0), k, v), None)
    records = PassManager(["remove_trace_asserts", "eliminate_dead_code", "annotate_regions",
                           ChunkPrefill(**options)]).run(graph, PassContext(
                               example_inputs=[n.meta["val"] for n in graph.input_nodes()]))
    return graph, records[-1]


def test_chunk_prefill_marks_each_cache_input_with_its_layer():
    model, _ = _model("llama")
    graph, record = _checked(model, chunk_size=CHUNK, layers=2)
    assert record.modified and record.stats["ops_joining_layers"] == 0
    layers = {n.name: graph.meta(n).layer for n in graph.input_nodes()}
    assert layers == {"input_ids": None, "start_pos": None, "k_cache_0": 0, "k_cache_1": 1, "v_cache_0": 0,
                      "v_cache_1": 1}


class _Stacking(LayerwiseKVCacheLM):
    """The per-layer form, but its new caches go through one stack: layer 0's output then waits for layer 1."""

    def forward(self, input_ids, start_pos, k_cache, v_cache):
        logits, k_new, v_new = super().forward(input_ids, start_pos, k_cache, v_cache)
        return logits, tuple(torch.stack(k_new).unbind(0)), v_new


def test_chunk_prefill_refuses_an_op_joining_the_layers_caches():
    model, _ = _model("llama")
    with pytest.raises(PassError, match=r"output k_new_0 \(.*\) depends on node .* of layer 1: an op joins the "
                                        r"layers' caches"):
        _checked(_Stacking(model))


def test_chunk_prefill_refuses_a_stacked_cache_and_a_wrong_chunk():
    model, _ = _model("llama")
    lm = KVCacheLM(model)
    k, v = lm.empty_cache(1, CAPACITY)
    graph = trace(lm, (torch.zeros(1, CHUNK, dtype=torch.long), torch.tensor(0), k, v), None)
    with pytest.raises(PassError, match=r"takes inputs \['input_ids', 'start_pos', 'k_cache', 'v_cache'\]; a chunk "
                                        r"program takes .*\(one cache tensor per layer"):
        PassManager(["annotate_regions", "chunk_prefill"]).run(graph, PassContext())
    with pytest.raises(PassError, match=r"input input_ids is \[1, 12\]: 12 tokens, not the chunk size 32"):
        _checked(model, chunk_size=32)
    with pytest.raises(PassError, match=r"caches for 2 layers; the model has 3"):
        _checked(model, layers=3)


@pytest.mark.parametrize("size", [0, -4, 2.5, True, "8"])
def test_compile_llm_refuses_a_chunk_size_that_is_not_a_positive_int(size):
    model, _ = _model("llama")
    with pytest.raises(KilnError, match=rf"chunk_size must be a positive int; got {size!r}"):
        compile_llm(model, chunk_size=size, capacity=CAPACITY)


def test_compile_llm_refuses_a_chunk_larger_than_the_cache_and_chunks_with_buckets():
    model, _ = _model("llama")
    with pytest.raises(KilnError, match=r"chunk_size \(65\) exceeds the cache capacity \(64\)"):
        compile_llm(model, chunk_size=CAPACITY + 1, capacity=CAPACITY)
    with pytest.raises(KilnError, match=r"give prefill_buckets or chunk_size, not both"):
        compile_llm(model, chunk_size=8, prefill_buckets=(16,), capacity=CAPACITY)


def test_prompts_outside_the_cache_raise_clear_errors(pair):
    _, ids, chunked, _ = pair
    with pytest.raises(InputMismatchError, match=r"the prompt has 65 tokens, more than the KV cache capacity \(64\)"):
        chunked.prefill(torch.zeros(1, CAPACITY + 1, dtype=torch.long))
    with pytest.raises(InputMismatchError, match=r"the prompt has 65 tokens, more than the KV cache capacity \(64\)"):
        chunked.generate(torch.zeros(1, CAPACITY + 1, dtype=torch.long), 1)
    with pytest.raises(InputMismatchError, match=r"needs 65 cache slots.*capacity 64"):
        chunked.generate(ids[:, :60], 5)
    with pytest.raises(InputMismatchError, match=r"the prompt is empty"):
        chunked.prefill(ids[:, :0])


def test_an_llm_index_whose_chunk_is_inconsistent_is_refused(pair):
    _, _, chunked, _ = pair
    artifact = chunked.artifact
    manifest = copy.deepcopy(dict(artifact.manifest))
    manifest["llm"]["chunk"]["program"] = "prefill_chunk_99"
    with pytest.raises(ArtifactError, match=r"field llm names program 'prefill_chunk_99', which is not in field "
                                            r"programs"):
        check_consistency(manifest, artifact.weights, "llm")
    manifest = copy.deepcopy(dict(artifact.manifest))
    del manifest["llm"]["chunk"]
    with pytest.raises(ArtifactError, match=r"field llm has no prefill program"):
        check_consistency(manifest, artifact.weights, "llm")
    manifest = copy.deepcopy(dict(artifact.manifest))
    del manifest["llm"]["chunk"]["carry"]["v_new_1"]
    with pytest.raises(KilnError, match=r"carry .* must map outputs .* to every cache input"):
        type(chunked)(CompiledModel(Artifact(manifest, artifact.weights, artifact.files)))


@pytest.mark.parametrize("name, batch", [("gpt2", 1), ("mixtral", 1), ("llama", 2)])
def test_chunked_prefill_for_other_families_and_a_batch(name, batch):
    """GPT-2 (learned positions: the padding's clamped to 0), Mixtral (MoE), and rows sliced per chunk (batch 2)."""
    model, (ids,) = zoo.MODELS[name](seq=40, batch=batch)
    model.generation_config.eos_token_id = None
    llm = compile_llm(model, batch=batch, chunk_size=8, capacity=48)
    for n in (5, 16, 17, 40):
        with torch.no_grad():
            eager = model(ids[:, :n]).logits[:, -1]
        torch.testing.assert_close(llm.prefill(ids[:, :n])[0], eager)
    expected = model.generate(ids[:, :17], max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(llm.generate(ids[:, :17], 8), expected, rtol=0, atol=0)


def test_on_the_npu_each_layers_cache_is_one_float_task_of_its_own():
    """With int8 linears on the emulated npu, layer l's cache is read and written by one cpu task, l's attention.

    That is what ScheduleBlocks needs: chunk i+1's layer-l attention waits for chunk i's layer-l task only.
    """
    import kiln
    from kiln.passes.extract_outliers import Int8Quantization

    model, ids = _model("llama")
    llm = compile_llm(model, chunk_size=CHUNK, capacity=CAPACITY, target="npu",
                      options=kiln.CompileOptions(int8=Int8Quantization()))
    program = llm.manifest["programs"][f"prefill_chunk_{CHUNK}"]
    outputs = dict(zip(llm.manifest["llm"]["chunk"]["outputs"], (o.get("value") for o in program["outputs"])))
    tasks = program["tasks"]
    assert {t["queue"] for t in tasks} == {"cpu0", "npu0"}
    owners = []
    for l in range(model.config.num_hidden_layers):
        readers = {t["name"] for t in tasks if {f"k_cache_{l}", f"v_cache_{l}"} & set(t["inputs"])}
        writers = {t["name"] for t in tasks if {outputs[f"k_new_{l}"], outputs[f"v_new_{l}"]} & set(t["outputs"])}
        assert len(readers) == 1 and readers == writers, (l, readers, writers)
        (owner,) = [t for t in tasks if t["name"] in readers]
        assert owner["queue"] == "cpu0"
        owners.append(owner["name"])
    assert len(set(owners)) == len(owners)
    logits, _, _ = llm.prefill(ids[:, :CHUNK + 1])
    with torch.no_grad():
        eager = model(ids[:, :CHUNK + 1]).logits[:, -1]
    assert logits.argmax(-1).equal(eager.argmax(-1))  # int8: the top token, not fp32 tolerance
