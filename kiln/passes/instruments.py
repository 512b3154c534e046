"""Instruments: the cross-cutting work done around every pass (TVM's PassInstrument idea).

Verification, snapshots, skipping, stopping early, numeric drift and progress
are instruments, never passes of their own.
"""
from __future__ import annotations

import os

import torch

from ..errors import UnknownNameError, VerificationError
from ..ir import Graph
from .base import Pass, PassContext, registered_passes
from .manager import Instrument, PassRecord, StopPipeline


def verification_default() -> bool:
    """Verification is on when ``KILN_VERIFY=1`` (the test suite sets it)."""
    return os.environ.get("KILN_VERIFY", "0") not in ("", "0", "false")


class Verify(Instrument):
    """Check the graph is well formed before the pipeline and after every pass."""

    def before_pipeline(self, graph: Graph, ctx: PassContext) -> None:
        graph.verify()

    def after_pass(self, graph: Graph, pass_: Pass, ctx: PassContext, record: PassRecord) -> None:
        try:
            graph.verify()
        except VerificationError as e:
            raise VerificationError(f"after pass {pass_.name!r}: {e}") from e


class Snapshot(Instrument):
    """Keep the printed IR before the pipeline and after every pass (``record.extra["ir"]``)."""

    def __init__(self):
        self.initial: str | None = None

    def before_pipeline(self, graph: Graph, ctx: PassContext) -> None:
        self.initial = graph.text()

    def after_pass(self, graph: Graph, pass_: Pass, ctx: PassContext, record: PassRecord) -> None:
        record.extra["ir"] = graph.text()


class Skip(Instrument):
    """Do not run the named passes."""

    def __init__(self, names):
        self.names = set(names)
        _check_names(self.names)

    def should_run(self, graph: Graph, pass_: Pass) -> bool:
        return pass_.name not in self.names


class StopAfter(Instrument):
    """End the pipeline after the named pass has run."""

    def __init__(self, name: str):
        _check_names({name})
        self.name = name

    def after_pass(self, graph: Graph, pass_: Pass, ctx: PassContext, record: PassRecord) -> None:
        if pass_.name == self.name:
            raise StopPipeline


class Drift(Instrument):
    """After every pass, run the graph on the example inputs and compare with the eager outputs.

    ``record.extra["drift"]`` is the largest absolute difference over all
    floating-point outputs (0.0 means bit-identical).
    """

    def __init__(self, inputs: list[torch.Tensor], reference: list):
        self.inputs = inputs
        self.reference = reference

    def after_pass(self, graph: Graph, pass_: Pass, ctx: PassContext, record: PassRecord) -> None:
        record.extra["drift"] = max_abs_diff(graph.run(self.inputs), self.reference)


def max_abs_diff(outputs: list, reference: list) -> float:
    worst = 0.0
    for got, want in zip(outputs, reference):
        if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor):
            if got.shape != want.shape:
                return float("inf")
            if got.numel():
                worst = max(worst, (got.double() - want.double()).abs().max().item())
    return worst


def _check_names(names) -> None:
    known = registered_passes()
    for n in names:
        if n not in known:
            raise UnknownNameError("pass", n, known)
