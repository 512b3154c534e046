"""kiln's runtime: loads artifacts and runs them, without the compiler.

It imports only kiln's IR types and never ``kiln.passes``: loading and running
an artifact never traces, never runs a pass and never unpickles.
"""
from __future__ import annotations

import os

from .artifact import Artifact, read_artifact, write_artifact
from .executor import CompiledModel, Control, ControlError, Program, Trace
from .threads import AdaptiveThreads

__all__ = ["AdaptiveThreads", "Artifact", "CompiledModel", "Control", "ControlError", "Program", "Trace", "load",
           "read_artifact", "write_artifact"]


def load(path: str | os.PathLike, trusted_keys=None):
    """Load a compiled model from an artifact directory, verifying it first.

    ``trusted_keys`` (ed25519 public keys: key objects, raw or PEM bytes):
    the artifact must carry a signature by one of them, checked before any
    of its code is loaded; an unsigned artifact is then refused. Without
    them, the checksums catch corruption but not a deliberate rewrite
    (docs/artifact-format.md, "Trust model").

    Returns a :class:`CompiledModel`, or a :class:`kiln.llm.CompiledLLM` for
    an artifact written by ``kiln.llm.compile_llm`` (its manifest has ``llm``).
    """
    model = CompiledModel(read_artifact(path, trusted_keys))
    if "llm" in model.manifest:
        from ..llm.runtime import CompiledLLM  # the runtime side only: kiln.llm.compile is the compiler side

        return CompiledLLM(model)
    return model
