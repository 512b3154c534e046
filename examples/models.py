"""Model factories for the command line: `kiln compile examples/models.py:llama -o out/llama`.

A factory takes no arguments and returns ``(model, example_inputs)``.
"""
from kiln import zoo


def llama():
    """A Llama-style causal LM from a small config (random weights), 64-token prompt."""
    return zoo.llama(hidden=256, layers=4, heads=8, kv_heads=4, vocab=4096, seq=64)


def minilm():
    """The trained all-MiniLM-L6-v2 sentence encoder, 2 sentences of 32 tokens."""
    return zoo.minilm(seq=32, batch=2)


def vit():
    """A ViT image classifier from a small config (random weights), one 224px image."""
    return zoo.vit(hidden=384, layers=4, heads=6, image=224, patch=16)
