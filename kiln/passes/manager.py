"""The pass manager: runs passes in order with instruments around each one.

Around every pass it records what changed (nodes added, removed, rewritten,
re-annotated: placement, layer, role, quant, chunk, stage),
stamps provenance on the nodes (``created_by`` / ``rewritten_by``),
re-propagates shapes and dtypes when the graph changed, and calls the
instruments. A failing pass is re-raised as :class:`~kiln.errors.PassError`
naming it and the passes that ran before it; an ``UnsupportedOpError`` (a
model's op that no backend runs, named by node: placement's) keeps its type.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import KilnError, PassError, UnsupportedOpError
from ..ir import Graph, NodeMeta
from ..ir.meta import META_KEY
from ..ir.rewrite import stamp_provenance
from .base import Pass, PassContext, PassResult, get_pass


@dataclass
class PassRecord:
    """What one pass did, as the pass manager saw it."""

    name: str
    seconds: float = 0.0
    modified: bool = False
    skipped: bool = False
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    annotated: list[str] = field(default_factory=list)  # same op and inputs, new placement/layer/role/quant/...
    stats: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # the pass's per-node notes (PassResult.notes)
    extra: dict[str, object] = field(default_factory=dict)  # filled by instruments (drift, snapshots)


class Instrument:
    """Hooks around every pass. Override what you need."""

    def should_run(self, graph: Graph, pass_: Pass) -> bool:
        return True

    def before_pass(self, graph: Graph, pass_: Pass, ctx: PassContext) -> None:
        pass

    def after_pass(self, graph: Graph, pass_: Pass, ctx: PassContext, record: PassRecord) -> None:
        pass

    def before_pipeline(self, graph: Graph, ctx: PassContext) -> None:
        pass

    def after_pipeline(self, graph: Graph, ctx: PassContext, records: list[PassRecord]) -> None:
        pass


class StopPipeline(Exception):
    """Raised by an instrument to end the pipeline after the current pass."""


class PassManager:
    def __init__(self, passes: list[str | Pass], instruments: list[Instrument] | None = None):
        self.passes = [get_pass(p) for p in passes]
        self.instruments = list(instruments or [])

    def run(self, graph: Graph, ctx: PassContext | None = None) -> list[PassRecord]:
        ctx = ctx or PassContext()
        records: list[PassRecord] = []
        for inst in self.instruments:
            inst.before_pipeline(graph, ctx)
        for p in self.passes:
            record = PassRecord(p.name)
            if not all(inst.should_run(graph, p) for inst in self.instruments):
                record.skipped = True
                records.append(record)
                continue
            missing = [r for r in p.requires if r not in ctx.ran]
            if missing:
                raise PassError(f"pass {p.name!r} requires {missing} to run before it; ran so far: {ctx.ran or 'none'}")
            try:
                for inst in self.instruments:
                    inst.before_pass(graph, p, ctx)
                before = _structure(graph.fx)
                start = time.perf_counter()
                result = p.run(graph, ctx)
                if not isinstance(result, PassResult):
                    raise KilnError(f"run() returned {type(result).__name__}, not a PassResult")
                _record_changes(graph, p.name, before, record)
                # Removing nodes cannot change the types of those left; metadata-only passes change none.
                if record.added or record.rewritten:
                    graph.propagate_types()
                record.seconds = time.perf_counter() - start
                record.modified = result.modified
                record.stats = dict(result.stats)
                record.notes = dict(result.notes)
                ctx.ran.append(p.name)
                stop = False
                for inst in self.instruments:
                    try:
                        inst.after_pass(graph, p, ctx, record)
                    except StopPipeline:
                        stop = True
            except PassError:
                raise
            except UnsupportedOpError as e:  # the model's op, named by node: the user's error, kept as it is
                e.add_note(f"(raised by pass {p.name!r})")
                raise
            except Exception as e:
                before_it = ", ".join(ctx.ran) or "none"
                raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {e}\n"
                                f"  passes run before it: {before_it}") from e
            records.append(record)
            if stop:
                break
        for inst in self.instruments:
            inst.after_pipeline(graph, ctx, records)
        return records


def _signature(n: fx.Node):
    def conv(a):
        return ("%", a.name) if isinstance(a, fx.Node) else a
    return (n.op, n.target, str(fx.node.map_aggregate(n.args, conv)), str(fx.node.map_aggregate(n.kwargs, conv)))


def _structure(graph: fx.Graph) -> dict[fx.Node, tuple]:
    return {n: (_signature(n), _annotations(n)) for n in graph.nodes}


def _annotations(n: fx.Node) -> dict:
    meta = n.meta.get(META_KEY)
    return meta.annotations() if isinstance(meta, NodeMeta) else {}


def _record_changes(graph: Graph, pass_name: str, before: dict[fx.Node, tuple], record: PassRecord) -> None:
    now = list(graph.fx.nodes)
    current = set(now)
    record.removed = [n.name for n in before if n not in current]
    for n in now:
        old = before.get(n)
        if old is None:
            record.added.append(n.name)
            # A pass may copy meta from the node it replaces; give the new node its own
            # (a replacement made with kiln.ir.rewrite keeps its origin's, rewritten by this pass).
            stamp_provenance(n, pass_name)
        elif old[0] != _signature(n):
            record.rewritten.append(n.name)
            Graph.meta(n).rewritten_by.append(pass_name)
        elif old[1] != _annotations(n):
            record.annotated.append(n.name)
