"""kiln's error types: every failure a user can cause surfaces as one of these.

Each message names what is at fault (the node, op, file, field or name) and,
where there is a fixed set of valid choices, lists them.
"""
from __future__ import annotations

from collections.abc import Iterable


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""


class TraceError(KilnError):
    """torch.export could not capture the model."""


class PassError(KilnError):
    """A pass failed; the message names it and the passes that ran before it."""


class VerificationError(KilnError):
    """The graph is not well formed, or its metadata is inconsistent."""


class UnsupportedOpError(KilnError):
    """A backend cannot run a node; the message names the node and its op.

    ``node`` is the node's name when one node is at fault (placement then moves
    just that node to the target's fallback backend).
    """

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node


class InputMismatchError(KilnError):
    """Run-time inputs differ from the ones the model was compiled for."""


class ArtifactError(KilnError):
    """An artifact on disk is missing, truncated, tampered with or of another version."""


class ProcessGroupError(KilnError):
    """A program calls a collective over a torch.distributed process group this process does not have."""


class TuningError(KilnError):
    """Tuning options are invalid, or a tuning database cannot be read; the message names the field or path."""


class FactoryError(KilnError):
    """A ``FILE.py:FACTORY`` given to the CLI does not exist or returns the wrong thing."""


class UnknownNameError(KilnError, ValueError):
    """An unknown target, pass, pipeline or option value; lists the known ones."""

    def __init__(self, kind: str, name: object, known: Iterable[str], plural: str | None = None):
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        plural = plural or (kind + "es" if kind.endswith("s") else kind + "s")
        super().__init__(f"unknown {kind} {name!r}; known {plural}: {', '.join(self.known) or '(none)'}")
