"""The LLM decode path: KVCacheLM against transformers' own cache, compiled greedy generation, save/load, errors.

Logits are compared with ``torch.testing.assert_close``'s fp32 defaults
(rtol 1.3e-6, atol 1e-5): the wrapper computes the same attention as
transformers, only over the whole cache capacity with masked slots, so the
sums differ in order only. Greedy tokens must be equal.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from kiln import zoo
from kiln.errors import InputMismatchError, KilnError
from kiln.llm.hf import KVCacheLM
from kiln.llm import compile_llm
from kiln.runtime import ControlError
from kiln.runtime.executor import Program

BUCKETS = (8, 16)
CAPACITY = 64
NEW_TOKENS = 12


def _model(name: str):
    model, (ids,) = zoo.MODELS[name](seq=11)  # 11 is not a bucket: the prompt is padded to 16
    model.generation_config.eos_token_id = None  # HF would stop at EOS; CompiledLLM generates exactly N tokens
    return model, ids


def _hf_greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def compiled(request):
    model, ids = _model(request.param)
    return model, ids, compile_llm(model, prefill_buckets=BUCKETS, capacity=CAPACITY)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mixtral", "gpt2"])
def test_wrapper_matches_hf_cache_for_prefill_and_decode(name):
    model, ids = _model(name)
    lm = KVCacheLM(model)
    k, v = lm.empty_cache(1, CAPACITY)
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        # Left-padded to a bucket and run at a negative start, as compile_llm's prefill runs it:
        # the last row is the prompt's last token, and the padding is written to no slot.
        n = ids.shape[1]
        padded = torch.cat([torch.zeros(1, 16 - n, dtype=torch.long), ids], dim=1)
        logits, k, v = lm(padded, torch.tensor(n - 16), k, v)
        assert logits.shape[1] == 1
        torch.testing.assert_close(logits, ref.logits[:, -1:])
        assert not k[:, :, :, n:].any() and not v[:, :, :, n:].any()
        cache, pos = ref.past_key_values, n
        token = ref.logits[:, -1:].argmax(-1)
        for _ in range(4):
            ref = model(token, past_key_values=cache, use_cache=True)
            logits, k, v = lm(token, torch.tensor(pos), k, v)
            torch.testing.assert_close(logits, ref.logits)
            token, pos = ref.logits[:, -1:].argmax(-1), pos + 1
        torch.testing.assert_close(k[:, :, :, :pos], torch.stack([layer.keys for layer in cache.layers]))
        torch.testing.assert_close(v[:, :, :, :pos], torch.stack([layer.values for layer in cache.layers]))


def test_compiled_greedy_generation_equals_hf(compiled):
    model, ids, llm = compiled
    torch.testing.assert_close(llm.generate(ids, NEW_TOKENS), _hf_greedy(model, ids, NEW_TOKENS), rtol=0, atol=0)
    prompt = ids[:, :5]  # a shorter prompt through the smaller bucket
    torch.testing.assert_close(llm.generate(prompt, NEW_TOKENS), _hf_greedy(model, prompt, NEW_TOKENS), rtol=0, atol=0)


def test_concurrent_generations_each_run_at_their_own_positions(compiled, monkeypatch):
    """start_pos is passed per call, not set on the shared program: threads generating at once do not race."""
    _, ids, llm = compiled
    prompts = [ids, ids[:, :5], ids[:, 3:], ids[:, :8]]
    expected = [llm.generate(p, NEW_TOKENS) for p in prompts]
    set_controls = Program.set_controls

    def set_then_yield(self, **values):  # widens the window a shared setting would race in
        set_controls(self, **values)
        time.sleep(0.002)
    monkeypatch.setattr(Program, "set_controls", set_then_yield)
    start = threading.Barrier(len(prompts))

    def generate(prompt):
        start.wait()
        return [llm.generate(prompt, NEW_TOKENS) for _ in range(3)]

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(generate, prompts))
    for want, got in zip(expected, results):
        assert all(torch.equal(g, want) for g in got)


def test_compiled_greedy_generation_equals_hf_for_a_batch():
    model, (ids,) = zoo.llama(seq=11, batch=2)  # rows of one length: CompiledLLM has no per-row lengths
    model.generation_config.eos_token_id = None
    llm = compile_llm(model, batch=2, prefill_buckets=(16,), capacity=CAPACITY)
    torch.testing.assert_close(llm.generate(ids, NEW_TOKENS), _hf_greedy(model, ids, NEW_TOKENS), rtol=0, atol=0)


def test_programs_take_start_pos_as_a_control_and_write_nothing_in_place(compiled):
    _, _, llm = compiled
    assert [i.name for i in llm.decode_graph.signature.inputs] == ["input_ids", "k_cache", "v_cache"]
    assert llm.decode_graph.controls["start_pos"].allowed == range(0, CAPACITY)
    assert llm.prefill_graphs[16].controls["start_pos"].allowed == range(-15, CAPACITY - 15)
    for graph in [llm.decode_graph, *llm.prefill_graphs.values()]:
        ops = {op for p in graph.entry["tasks"] for op in _ops(p["report"]) if op.startswith("aten.")}
        # TVM drops in-place updates and cannot convert a bool cumsum.
        assert not [op for op in ops if _mutates(op) or "cumsum" in op], sorted(ops)


def test_one_artifact_holds_every_program_over_one_weight_store(compiled, tmp_path):
    import json

    from safetensors import safe_open

    model, _, llm = compiled
    path = llm.save(tmp_path / "llm")
    assert not (path / "llm.json").exists()
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["programs"]) == ["decode", "prefill_16", "prefill_8"]
    assert manifest["llm"] == {"prefill": {"8": "prefill_8", "16": "prefill_16"}, "decode": "decode"}
    with safe_open(path / "weights.safetensors", "pt") as f:
        stored = list(f.keys())
    # every parameter once, though three programs read them
    assert len(stored) <= len(dict(model.named_parameters())) + 8, stored
    read = {w for p in manifest["programs"].values() for t in p["tasks"] for w in t["weights"]}
    assert read <= set(stored) | set(manifest["weight_aliases"])


def test_an_llm_saved_by_kiln_0_1_is_refused_naming_how_to_rebuild_it(tmp_path):
    import kiln.llm
    from kiln.errors import ArtifactError

    old = tmp_path / "old"
    (old / "decode").mkdir(parents=True)
    (old / "llm.json").write_text('{"format": "kiln-llm", "format_version": 2}')
    with pytest.raises(ArtifactError, match=r"saved by kiln 0.1 .* llm.json; .* rebuild it with this kiln"):
        kiln.llm.load(old)


def test_prefill_computes_the_lm_head_for_the_last_row_only(compiled):
    model, _, llm = compiled
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    for graph in llm.prefill_graphs.values():
        (pruned,) = [p for p in graph.entry["passes"] if p["name"] == "prune_rows"]
        assert pruned["stats"]["ops_narrowed"] > 0
        gemms = [g["gemm"] for p in graph.entry["tasks"] for g in p["report"].get("gemm_kernels", [])]
        assert f"linear [1x{hidden}] x [{hidden}x{vocab}]" in gemms, gemms  # the LM head, on one row


def _ops(report: dict) -> list[str]:
    """The ops a partition runs: the torch backend lists them, the cpu (TVM) backend reports per node."""
    return report["ops"] if "ops" in report else [n["op"] for n in report["nodes"]]


def _mutates(op: str) -> bool:
    _, name, overload = op.split(".")
    return getattr(getattr(torch.ops.aten, name), overload)._schema.is_mutable


def test_saved_llm_generates_in_a_fresh_process_without_the_compiler(compiled, tmp_path, fresh_python):
    model, ids, llm = compiled
    llm.save(tmp_path / "llm")
    save_file({"ids": ids, "expected": _hf_greedy(model, ids, NEW_TOKENS)}, str(tmp_path / "io.safetensors"))
    out = fresh_python(f"""
        import sys
        import kiln
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / 'io.safetensors')!r})
        llm = kiln.load({str(tmp_path / 'llm')!r})  # one artifact: kiln.load returns a CompiledLLM for it
        assert type(llm).__name__ == "CompiledLLM", llm
        assert torch.equal(llm.generate(io["ids"], {NEW_TOKENS}), io["expected"])
        leaked = [m for m in sys.modules if m.startswith(("kiln.passes", "kiln.api", "kiln.backends", "kiln.ir.tracing",
                                                          "kiln.llm.compile", "kiln.llm.hf", "kiln.zoo", "transformers"))]
        assert not leaked, leaked
        print("ok")
    """)
    assert out.strip() == "ok"


def test_saved_llm_is_signed_replaced_in_place_and_never_clobbers_other_files(compiled, tmp_path):
    from kiln.errors import ArtifactError
    from kiln.llm import load
    from kiln.runtime import signing

    _, ids, llm = compiled
    key = signing.generate_signing_key()
    path = llm.save(tmp_path / "llm", signing_key=key)
    llm.save(path, signing_key=key)  # replaces the earlier save
    loaded = load(path, trusted_keys=[signing.public_key_bytes(key)])
    assert torch.equal(loaded.generate(ids, 2), llm.generate(ids, 2))
    with pytest.raises(ArtifactError, match="which is not one of the 1 trusted keys"):
        load(path, trusted_keys=[signing.generate_signing_key().public_key()])
    (path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"a kiln artifact, but it also holds files it does not list \(notes.txt\)"):
        llm.save(path)
    assert (path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm"]


def test_requests_outside_the_compiled_shapes_raise_clear_errors(compiled):
    _, ids, llm = compiled
    with pytest.raises(InputMismatchError, match=r"17 tokens, more than the largest prefill bucket \(16\)"):
        llm.generate(torch.zeros(1, 17, dtype=torch.long), 1)
    with pytest.raises(InputMismatchError, match=r"needs 65 cache slots.*capacity 64"):
        llm.generate(ids, CAPACITY + 1 - ids.shape[1])
    with pytest.raises(InputMismatchError, match=r"batch size 2; this LLM was compiled for batch 1"):
        llm.generate(ids.repeat(2, 1), 1)
    with pytest.raises(ControlError, match=r"control 'start_pos' cannot be 64; it allows an integer from 0 to 63"):
        llm.decode_graph.set_controls(start_pos=CAPACITY)


def test_compile_llm_refuses_a_bucket_larger_than_the_cache():
    model, _ = _model("llama")
    with pytest.raises(KilnError, match=r"largest prefill bucket \(128\) exceeds the cache capacity \(64\)"):
        compile_llm(model, prefill_buckets=(8, 128), capacity=64)
