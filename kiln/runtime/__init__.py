"""kiln's runtime: loads artifacts and runs them, without the compiler.

It imports only kiln's IR types and never ``kiln.passes``: loading and running
an artifact never traces, never runs a pass and never unpickles.
"""
from __future__ import annotations

import os

from .artifact import Artifact, read_artifact, write_artifact
from .executor import CompiledModel

__all__ = ["Artifact", "CompiledModel", "load", "read_artifact", "write_artifact"]


def load(path: str | os.PathLike) -> CompiledModel:
    """Load a compiled model from an artifact directory, verifying it first."""
    return CompiledModel(read_artifact(path))
