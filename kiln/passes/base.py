"""The pass interface, the pass registry and the context passes run in."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import KilnError, UnknownNameError
from ..ir import Graph


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, and counters for logs and tests."""

    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # per node name: why (e.g. a placement refusal)


@dataclass
class PassContext:
    """What a pass may read besides the graph: the target, options, example inputs and calibration data."""

    target: str = "cpu"
    example_inputs: list[torch.Tensor] = field(default_factory=list)  # flat user inputs (fake tensors: shapes)
    options: Any = None  # kiln.api.CompileOptions when run through kiln.compile
    ran: list[str] = field(default_factory=list)  # names of the passes run so far
    real_inputs: list[torch.Tensor] = field(default_factory=list)  # the same example inputs, real tensors
    calibration: list[list[torch.Tensor]] | None = None  # flat user inputs per sample (CompileOptions.calibration)
    backends: list | None = None  # the target's kiln.backends.Backend objects, most preferred first (None: build them)
    _activation_stats: Any = field(default=None, repr=False, compare=False)  # cache of activation_stats

    def activation_stats(self, graph: Graph, *, histograms: bool = True, bins: int | None = None,
                         progress: bool | None = None):
        """Per-node activation statistics of ``graph`` as it is now (kiln.passes.calibration), cached."""
        from .calibration import DEFAULT_BINS, stats_for

        return stats_for(self, graph, histograms=histograms, bins=bins or DEFAULT_BINS, progress=progress)


class Pass(ABC):
    """One rewrite of the graph. Subclasses set ``name`` and implement ``run``.

    ``run`` edits ``graph`` in place and touches nothing else. It need not
    re-propagate types or record provenance: the pass manager does both.
    ``requires`` names passes that must have run earlier in the pipeline.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> PassResult: ...

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name (names are unique)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise KilnError(f"pass class {cls.__name__} has no name")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise KilnError(f"a pass named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def get_pass(name: str | Pass) -> Pass:
    if isinstance(name, Pass):
        return name
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise UnknownNameError("pass", name, _REGISTRY) from None
