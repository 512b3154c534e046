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

from .backends import LoweredPartition, place_and_lower, target_backends
from .backends.base import check_backend_options
from .errors import KilnError, UnknownNameError
from .ir import Graph
from .ir.tracing import trace
from .passes import (Instrument, PassContext, PassManager, PassRecord, Skip, StopAfter, Verify, get_pipeline,
                     verification_default)
from .passes.calibration import check_calibration, flatten_calibration
from .passes.extract_outliers import Int8Quantization
from .passes.lower_precision import PRECISIONS
from .passes.quantize_nested import NestedQuantization, apply_plan
from .runtime import Artifact, CompiledModel
from .runtime.artifact import merge_programs, new_manifest, program_entry
from .runtime.executor import PLAN_CONTROL

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
    # Each backend's own options, by backend name: {"cpu": kiln.backends.cpu.CpuOptions(tune_trials=64)}.
    # A backend without an entry gets its defaults; an unknown name or a wrong type is an error.
    backend_options: dict[str, Any] = field(default_factory=dict)
    # Calibration data for passes that measure activations (kiln/passes/calibration.py): an
    # iterable of input tuples, each called like the example inputs. Kept as a list.
    calibration: Any = field(default=None, repr=False)
    # Nested weight quantization with run-time bit-width plans (kiln/passes/quantize_nested.py); None: float.
    quantization: NestedQuantization | None = None
    # w8a8 linears with their activation outliers in float beside them (kiln/passes/extract_outliers.py); None: float.
    int8: Int8Quantization | None = None
    # "bf16": GEMMs and attention in bf16 where the CPU has bf16 units, norms/softmax/the rest in fp32
    # (kiln/passes/lower_precision.py); "fp32" (default): everything in the model's own dtype.
    precision: str = "fp32"
    # PyTorch intra-op threads each call of a program runs with (the calling thread's, restored after): None
    # leaves them; an int fixes them; "measure" times every program at one thread and at the caller's count at
    # compile time and keeps the faster (a decode step of TVM kernels runs faster when PyTorch's OpenMP threads
    # do not spin beside TVM's pool, which then takes the caller's threads: kiln/runtime/kernels/tvm_vm.py);
    # "auto" (default): "measure" when `quantization` is set (its low-bit kernels are TVM's), else None.
    # Recorded in the artifact.
    intra_op_threads: int | str | None = "auto"

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
        if self.calibration is not None:
            self.calibration = check_calibration(self.calibration)
        self.backend_options = check_backend_options(self.backend_options)
        if self.quantization is not None and not isinstance(self.quantization, NestedQuantization):
            raise KilnError("CompileOptions.quantization must be a kiln.NestedQuantization, "
                            f"not {type(self.quantization).__name__}")
        if self.int8 is not None and not isinstance(self.int8, Int8Quantization):
            raise KilnError(f"CompileOptions.int8 must be a kiln.Int8Quantization, not {type(self.int8).__name__}")
        if self.int8 is not None and self.quantization is not None:
            raise KilnError("CompileOptions.int8 and CompileOptions.quantization both quantize the linears: "
                            "set one of them")
        if self.intra_op_threads is not None and self.intra_op_threads not in ("measure", "auto") and not (
                isinstance(self.intra_op_threads, int) and not isinstance(self.intra_op_threads, bool)
                and self.intra_op_threads >= 1):
            raise KilnError("CompileOptions.intra_op_threads must be None, a positive int, 'measure' or 'auto'; got "
                            f"{self.intra_op_threads!r}")
        if self.precision not in PRECISIONS:
            raise UnknownNameError("value for CompileOptions.precision", self.precision, PRECISIONS)
        if self.precision != "fp32" and (self.int8 is not None or self.quantization is not None):
            raise KilnError(f"CompileOptions.precision={self.precision!r} and CompileOptions."
                            f"{'int8' if self.int8 is not None else 'quantization'} both lower the linears' "
                            "precision: set one of them")

    def verifying(self) -> bool:
        return self.verify is VerifyMode.ALWAYS or (self.verify is VerifyMode.AUTO and verification_default())


_ENUM_FIELDS = {"verify": VerifyMode}


def compile(model: torch.nn.Module, example_inputs, target: str = "cpu", passes: list[str] | None = None,
            options: CompileOptions | None = None, example_kwargs: dict | None = None) -> CompiledModel:
    """Compile ``model`` for ``target``; the result is called like ``model(*example_inputs)``."""
    compilation = Compilation(target, passes, options)
    compilation.trace(model, example_inputs, example_kwargs)
    compilation.optimize()
    return compilation.lower()


class Compilation:
    """The stages of :func:`compile`, for tools that look between them (``kiln inspect``).

    Creating one checks the target, pipeline and pass names, so a typo is
    reported before a model is built or traced. Then ``trace`` → ``optimize``
    → ``lower``, each once, in that order.
    """

    def __init__(self, target: str = "cpu", passes: list[str] | None = None, options: CompileOptions | None = None):
        if options is not None and not isinstance(options, CompileOptions):
            raise KilnError(f"options must be a kiln.CompileOptions, not {type(options).__name__}")
        self.target = target
        self.options = options or CompileOptions()
        self.backends = target_backends(target, self.options)
        self.pass_names = list(passes) if passes is not None else get_pipeline(self.options.pipeline or target)
        self._instruments = self._standard_instruments()
        PassManager(self.pass_names)  # resolves every pass name now, or raises
        if self.options.precision != "fp32" and "lower_precision" not in self.pass_names:
            raise KilnError(f"CompileOptions.precision={self.options.precision!r}: the pipeline of target "
                            f"{target!r} has no lower_precision pass to apply it")
        self.graph: Graph | None = None
        self.flat_inputs: list[torch.Tensor] = []
        self.records: list[PassRecord] = []
        self.lowered: dict[str, LoweredPartition] = {}  # by partition name, after lower()

    def _standard_instruments(self) -> list[Instrument]:
        instruments: list[Instrument] = []
        if self.options.verifying():
            instruments.append(Verify())
        if self.options.skip_passes:
            instruments.append(Skip(self.options.skip_passes))
        if self.options.stop_after:
            instruments.append(StopAfter(self.options.stop_after))
        return instruments + list(self.options.instruments)

    def trace(self, model: torch.nn.Module, example_inputs, example_kwargs: dict | None = None) -> Graph:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.graph = trace(model, args, example_kwargs, dynamic_shapes=self.options.dynamic_shapes)
        self.flat_inputs = self.graph.signature.flatten(args, example_kwargs or {})
        return self.graph

    def optimize(self, extra_instruments: list[Instrument] = ()) -> list[PassRecord]:
        graph = self._need_graph("optimize")
        pm = PassManager(self.pass_names, self._instruments + list(extra_instruments))
        calibration = self.options.calibration
        ctx = PassContext(target=self.target, example_inputs=[n.meta["val"] for n in graph.input_nodes()],
                          options=self.options, real_inputs=list(self.flat_inputs), backends=self.backends,
                          calibration=None if calibration is None else flatten_calibration(calibration, graph.signature))
        self.records = pm.run(graph, ctx)
        for r in self.records:
            log.debug("kiln: pass %s: %.1f ms, +%d -%d ~%d", r.name, r.seconds * 1e3, len(r.added), len(r.removed),
                      len(r.rewritten))
        return self.records

    def lower(self) -> CompiledModel:
        """Place, partition and lower the graph; package it as an in-memory artifact.

        A graph with bit-width plans (``quantize_nested``) is lowered once per
        plan, each a program of the one artifact over one weight store; the
        run-time control ``plan`` picks the program a call runs.
        """
        graph = self._need_graph("lower")
        if not graph.plans:
            artifact = self._lower_program(graph, "main")
        else:
            parts = {}
            for plan in [*(p for p in graph.plans if p != graph.default_plan), graph.default_plan]:
                apply_plan(graph, plan)  # in place; the default plan's last, so the graph ends at it
                parts[plan] = self._lower_program(graph, plan)
            parts = {plan: parts[plan] for plan in graph.plans}
            artifact = merge_programs(parts, default_program=graph.default_plan,
                                      selector={"name": PLAN_CONTROL, "values": list(parts),
                                                "default": graph.default_plan},
                                      quantization=graph.quantization)
            artifact.example_inputs = parts[graph.default_plan].example_inputs
        model = CompiledModel(artifact)
        threads = self.options.intra_op_threads
        if threads == "auto":
            threads = "measure" if self.options.quantization is not None else None
        if threads is not None:
            _choose_intra_op_threads(model, self.flat_inputs, threads)
        return model

    def _lower_program(self, graph: Graph, name: str) -> Artifact:
        partitions, self.lowered, outputs, fallbacks = place_and_lower(graph, self.target, self.backends)
        entries, files, used = [], {}, {}
        for p in partitions:
            lowered = self.lowered[p.name]
            modeled = next((us for b in self.backends if (us := b.modeled_task_us(p)) is not None), None)
            if modeled is not None:  # the target's device model (npu), for ScheduleBlocks: never a measurement
                lowered.report["modeled_us"] = round(float(modeled), 3)
            for fname, data in lowered.files.items():
                if fname in files:
                    raise KilnError(f"backend {p.backend!r} produced file {fname!r} twice")
                files[fname] = data
            entries.append({
                "name": p.name, "backend": p.backend, "format": lowered.format,
                **({"queue": p.queue} if p.queue is not None else {}),
                "inputs": p.inputs, "outputs": p.outputs, "weights": p.weight_names,
                "spec": lowered.spec, "report": lowered.report,
                # what the kernel loader reads; compiler_files are stored and hashed, never loaded
                "files": sorted(set(lowered.files) - set(lowered.compiler_files)),
                **({"compiler_files": sorted(lowered.compiler_files)} if lowered.compiler_files else {}),
            })
            used.update(p.weights)
        for o in outputs:
            if o.get("value") in graph.weights:  # the model returns a weight as is
                used[o["value"]] = graph.weights[o["value"]]
        program = program_entry(
            graph.signature.to_json(), entries, outputs,
            weight_sources={k: v for k, v in graph.weight_sources.items() if k in used},
            passes=[_record_json(r) for r in self.records],
            # nodes a backend could not lower after all, and ran on the target's fallback instead
            fallbacks=fallbacks or None)
        manifest = new_manifest({name: program}, target=self.target, model=graph.name,
                                torch_version=torch.__version__, tvm_version=_package_version("apache-tvm"))
        examples = list(self.flat_inputs) if self.options.keep_example_inputs else None
        return Artifact(manifest, used, files, examples)

    def _need_graph(self, stage: str) -> Graph:
        if self.graph is None:
            raise KilnError(f"Compilation.{stage}() needs trace() first")
        return self.graph


def _choose_intra_op_threads(model: CompiledModel, flat_inputs: list, choice, rounds: int = 7) -> None:
    """Set each program's ``intra_op_threads``: ``choice`` itself, or (``"measure"``) the faster of one thread and
    the caller's count over interleaved timed calls on the example inputs (one thread only when 5% faster)."""
    import statistics
    import time

    full = torch.get_num_threads()
    for program in model.programs.values():
        if choice != "measure":
            program.entry["intra_op_threads"] = int(choice)
            continue
        if full == 1:
            program.entry["intra_op_threads"] = 1
            continue
        times: dict[int, list[float]] = {1: [], full: []}
        for r in range(rounds + 2):
            for n in times:
                program.entry["intra_op_threads"] = n
                start = time.perf_counter()
                program.run(list(flat_inputs), ask_policy=False)
                if r >= 2:  # two warm-up rounds
                    times[n].append(time.perf_counter() - start)
        ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        program.entry["intra_op_threads"] = 1 if ms[1] < 0.95 * ms[full] else full
        program.entry["intra_op_threads_measured_ms"] = {str(n): round(v, 3) for n, v in ms.items()}
        log.debug("kiln: program %s: %.2f ms on 1 thread, %.2f ms on %d: runs on %d", program.name, ms[1],
                  ms[full], full, program.entry["intra_op_threads"])


def _record_json(r: PassRecord) -> dict:
    return {"name": r.name, "skipped": r.skipped, "seconds": round(r.seconds, 6), "modified": r.modified,
            "added": len(r.added), "removed": len(r.removed), "rewritten": len(r.rewritten),
            "annotated": len(r.annotated), "stats": r.stats, **({"notes": r.notes} if r.notes else {})}


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
