"""``kiln.compile``: trace, run the pass pipeline, place, partition, lower, package.

The result is a :class:`~kiln.runtime.CompiledModel` over an in-memory
artifact, the same object ``kiln.load`` returns for one on disk.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .backends import assign_placement, split_by_placement, target_backends
from .errors import KilnError, UnknownNameError
from .ir import Graph
from .ir.trace import trace
from .passes import (Instrument, PassContext, PassManager, PassRecord, Skip, StopAfter, Verify, get_pipeline,
                     verification_default)
from .runtime import Artifact, CompiledModel
from .runtime.artifact import FORMAT_NAME, FORMAT_VERSION

log = logging.getLogger("kiln")


class VerifyMode(str, enum.Enum):
    AUTO = "auto"  # on when KILN_VERIFY=1 (the test suite sets it)
    ALWAYS = "always"
    NEVER = "never"


@dataclass
class CompileOptions:
    """Everything that tunes a compilation. Enum fields also accept their string values."""

    pipeline: str | None = None  # a named pipeline; default: the target's own
    skip_passes: tuple[str, ...] = ()
    stop_after: str | None = None  # end the pipeline after this pass
    verify: VerifyMode = VerifyMode.AUTO
    dynamic_shapes: Any = None  # passed to torch.export.export as is
    keep_example_inputs: bool = True  # store them in the artifact, for `kiln run`
    instruments: list[Instrument] = field(default_factory=list)  # extra instruments around every pass

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            enum_type = _ENUM_FIELDS.get(f.name)
            if enum_type is not None and not isinstance(value, enum_type):
                try:
                    setattr(self, f.name, enum_type(value))
                except ValueError:
                    raise UnknownNameError(f"value for CompileOptions.{f.name}", value,
                                           [m.value for m in enum_type]) from None
        self.skip_passes = tuple(self.skip_passes)

    def verifying(self) -> bool:
        return self.verify is VerifyMode.ALWAYS or (self.verify is VerifyMode.AUTO and verification_default())


_ENUM_FIELDS = {"verify": VerifyMode}


def compile(model: torch.nn.Module, example_inputs, target: str = "cpu", passes: list[str] | None = None,
            options: CompileOptions | None = None, example_kwargs: dict | None = None) -> CompiledModel:
    """Compile ``model`` for ``target``; the result is called like ``model(*example_inputs)``."""
    options = _check_options(options)
    backends = target_backends(target)
    pm = pass_manager(target, passes, options)
    graph = trace(model, example_inputs, example_kwargs, dynamic_shapes=options.dynamic_shapes)
    flat_inputs = graph.signature.flatten(_as_tuple(example_inputs), example_kwargs or {})
    records = run_passes(graph, pm, target, options)
    return lower(graph, target, backends, records, options, flat_inputs)


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _check_options(options) -> CompileOptions:
    if options is None:
        return CompileOptions()
    if not isinstance(options, CompileOptions):
        raise KilnError(f"options must be a kiln.CompileOptions, not {type(options).__name__}")
    return options


def pass_manager(target: str, passes: list[str] | None, options: CompileOptions,
                 extra: list[Instrument] = ()) -> PassManager:
    names = list(passes) if passes is not None else get_pipeline(options.pipeline or target)
    instruments: list[Instrument] = []
    if options.verifying():
        instruments.append(Verify())
    if options.skip_passes:
        instruments.append(Skip(options.skip_passes))
    if options.stop_after:
        instruments.append(StopAfter(options.stop_after))
    return PassManager(names, instruments + list(options.instruments) + list(extra))


def run_passes(graph: Graph, pm: PassManager, target: str, options: CompileOptions) -> list[PassRecord]:
    ctx = PassContext(target=target, example_inputs=_example_flat(graph), options=options)
    records = pm.run(graph, ctx)
    for r in records:
        log.debug("kiln: pass %s: %.1f ms, +%d -%d ~%d", r.name, r.seconds * 1e3, len(r.added), len(r.removed),
                  len(r.rewritten))
    return records


def _example_flat(graph: Graph) -> list[torch.Tensor]:
    return [n.meta["val"] for n in graph.input_nodes()]  # fake tensors: shapes for passes that need them


def lower(graph: Graph, target: str, backends, records: list[PassRecord], options: CompileOptions,
          example_inputs: list[torch.Tensor] | None = None) -> CompiledModel:
    """Place, partition and lower an optimised graph; package it as an in-memory artifact."""
    assign_placement(graph, target, backends)
    partitions, outputs = split_by_placement(graph)
    by_name = {b.name: b for b in backends}
    entries, files, used = [], {}, {}
    for p in partitions:
        lowered = by_name[p.backend].lower(p)
        for fname, data in lowered.files.items():
            if fname in files:
                raise KilnError(f"backend {p.backend!r} produced file {fname!r} twice")
            files[fname] = data
        entries.append({
            "name": p.name, "backend": p.backend, "format": lowered.format,
            "inputs": p.inputs, "outputs": p.outputs, "weights": p.weight_names,
            "spec": lowered.spec, "files": sorted(lowered.files), "report": lowered.report,
        })
        used.update(p.weights)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kiln_version": __version__,
        "torch_version": torch.__version__,
        "tvm_version": _package_version("apache-tvm"),
        "target": target,
        "model": graph.name,
        "signature": graph.signature.to_json(),
        "partitions": entries,
        "outputs": outputs,
        "weight_sources": {k: v for k, v in graph.weight_sources.items() if k in used},
        "passes": [_record_json(r) for r in records],
    }
    for o in outputs:
        if o.get("value") in graph.weights:  # the model returns a weight as is
            used[o["value"]] = graph.weights[o["value"]]
    artifact = Artifact(manifest, used, files)
    model = CompiledModel(artifact)
    if options.keep_example_inputs and example_inputs is not None:
        artifact.example_inputs = list(example_inputs)
    return model


def _record_json(r: PassRecord) -> dict:
    return {"name": r.name, "skipped": r.skipped, "seconds": round(r.seconds, 6), "modified": r.modified,
            "added": len(r.added), "removed": len(r.removed), "rewritten": len(r.rewritten), "stats": r.stats}


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
