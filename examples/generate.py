"""Greedy text-token generation with kiln's compiled prefill + decode graphs, checked against transformers.

Builds a Llama-style causal LM from a small config with RANDOM weights (the
tokens mean nothing; what matters is that kiln's equal transformers' own),
compiles one prefill graph per prompt bucket and one single-token decode graph
(the KV cache passed in and out as tensors), generates from a prompt of token
ids, checks the tokens against ``model.generate(..., do_sample=False)``, and
times prefill and per-token decode for eager transformers (with its own
DynamicCache) and for kiln.

    .venv/bin/python examples/generate.py [--hidden 256 --layers 4 --prompt 20 --new 32 --target cpu]
    .venv/bin/python examples/generate.py --chunk-size 16 --prompt 50   # chunked prefill: one 16-token graph
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kiln import zoo  # noqa: E402
from kiln.llm import compile_llm  # noqa: E402
from kiln.timing import median_ms  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=20, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=32, help="tokens to generate")
    ap.add_argument("--buckets", default="32,64", help="prefill prompt-length buckets")
    ap.add_argument("--chunk-size", type=int, default=None, help="chunked prefill with one graph of this many "
                    "tokens instead of buckets")
    ap.add_argument("--capacity", type=int, default=128, help="KV cache slots")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    model, (prompt,) = zoo.llama(hidden=args.hidden, layers=args.layers, heads=8, kv_heads=2, vocab=args.vocab,
                                 seq=args.prompt)
    model.generation_config.eos_token_id = None  # generate exactly --new tokens, as CompiledLLM does
    print(f"Llama-style model with RANDOM weights: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}")

    start = time.perf_counter()
    if args.chunk_size is not None:
        llm = compile_llm(model, chunk_size=args.chunk_size, capacity=args.capacity, target=args.target)
        prefill = f"1 chunk program of {llm.chunk_size} tokens ({len(llm.chunk_starts(args.prompt))} calls per prompt)"
    else:
        llm = compile_llm(model, prefill_buckets=tuple(int(b) for b in args.buckets.split(",")),
                          capacity=args.capacity, target=args.target)
        prefill = f"{len(llm.buckets)} prefill graphs (buckets {llm.buckets})"
    print(f"compiled {prefill} + 1 decode graph, KV cache {list(llm.cache_shape)}, "
          f"in {time.perf_counter() - start:.1f} s")

    tokens = llm.generate(prompt, args.new)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=args.new, do_sample=False)
    print(f"prompt ids:    {prompt[0].tolist()}")
    print(f"kiln tokens:   {tokens[0, args.prompt:].tolist()}")
    same = torch.equal(tokens, expected)
    print(f"transformers greedy generate gives the same tokens: {'yes' if same else 'NO'}")
    if not same:
        print(f"transformers:  {expected[0, args.prompt:].tolist()}")

    times = time_prefill_and_decode(model, llm, prompt, steps=args.new - 1, repeat=args.repeat)
    print(f"\ntimes (median of {args.repeat}, {torch.get_num_threads()} threads; kiln target {args.target}; "
          f"kiln's decode attends over all {llm.capacity} cache slots, eager over the tokens so far)")
    print(f"  {'':<14}{'prefill ms':>12}{'decode ms/token':>18}")
    for who in ("eager HF", "kiln"):
        print(f"  {who:<14}{times[who + ' prefill']:>12.2f}{times[who + ' decode']:>18.2f}")
    return 0 if same else 1


def time_prefill_and_decode(model, llm, prompt: torch.Tensor, steps: int, repeat: int) -> dict[str, float]:
    """Prefill ms of each, and decode ms per token averaged over ``steps`` tokens after the prompt."""
    n = prompt.shape[1]
    with torch.no_grad():
        eager = model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True)
    eager_cache, first = eager.past_key_values, eager.logits[:, -1:].argmax(-1)
    _, k0, v0 = llm.prefill(prompt)

    def eager_prefill():  # as transformers' generate runs it: logits of the last position only
        with torch.no_grad():
            model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

    def eager_decode():
        eager_cache.crop(n - eager_cache.get_seq_length())  # back to the prompt: every round decodes the same positions
        token = first
        with torch.no_grad():
            for _ in range(steps):
                token = model(token, past_key_values=eager_cache, use_cache=True).logits[:, -1:].argmax(-1)

    def kiln_decode():
        k, v, token = k0, v0, first
        for pos in range(n, n + steps):
            logits, k, v = llm.decode(token, pos, k, v)
            token = logits.argmax(-1, keepdim=True)

    ms = median_ms({"eager HF prefill": eager_prefill, "kiln prefill": lambda: llm.prefill(prompt),
                    "eager HF decode": eager_decode, "kiln decode": kiln_decode}, repeat=repeat, warmup=1)
    return {name: t / steps if name.endswith("decode") else t for name, t in ms.items()}


if __name__ == "__main__":
    sys.exit(main())
