"""kiln: a compiler for PyTorch models.

``kiln.compile`` and ``kiln.load`` are imported lazily so that loading an
artifact (``kiln.load``) never imports the compiler side (``kiln.passes``).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["compile", "load", "CompileOptions", "NestedQuantization", "Int8Quantization", "KilnError", "__version__"]


def __getattr__(name: str):
    if name in ("compile", "CompileOptions", "NestedQuantization", "Int8Quantization"):
        from . import api

        return getattr(api, name)
    if name == "load":
        from .runtime import load

        return load
    if name == "KilnError":
        from .errors import KilnError

        return KilnError
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
