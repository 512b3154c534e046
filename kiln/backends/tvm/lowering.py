"""Lower one FX partition to a TVM Relax VM library for a target.

``lower_partition`` runs the stages of ``pipeline.py`` with the parts a
``TvmTarget`` contributes (``target.py``; the CPU's is ``kiln.backends.cpu.target.CpuTarget``)
and returns the ``export_library`` bytes with a JSON spec that ``TvmVmKernel``
needs to run them (no recompiling at load time) and a report of what went
where. A target that tunes (the CPU with MetaSchedule) schedules kernels
between ``fuse`` and ``schedule``; its rules then schedule only the rest.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import tvm
from tvm import relax, tirx

from ...errors import UnsupportedOpError
from ...ir.meta import dtype_name
from ...runtime.kernels import tvm_dispatch
from .convert import to_relax
from .fusion import FUSED
from .pipeline import stage
from .schedule import META_SCHEDULE, applied_rule
from .target import TvmTarget, tvm_version

ENTRY = "main"
FORMAT = "tvm-vm"


@dataclass
class TvmLowered:
    library: bytes  # the shared library ``Executable.export_library`` wrote
    spec: dict  # JSON-serialisable: what TvmVmKernel needs, plus the report
    kernels: dict[str, str] = field(default_factory=dict)  # TIR kernel name -> scheduled TIR script
    tuning: Any = None  # what the target's tune stage did (None: it did not run); the CPU's: TuningResult

    def tir(self, kernel: str) -> str:
        """The scheduled TIR of one kernel (names as in ``spec["report"]["kernels"]``)."""
        if kernel not in self.kernels:
            raise KeyError(f"no TIR kernel {kernel!r}; kernels: {', '.join(sorted(self.kernels))}")
        return self.kernels[kernel]


def lower_partition(gm: fx.GraphModule, num_inputs: int, weights: dict[str, torch.Tensor],
                    target: TvmTarget) -> TvmLowered:
    """Compile ``gm`` (placeholders: ``num_inputs`` inputs, then weights by name) for ``target``."""
    target_json = target.target_json()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs, weight_nodes = placeholders[:num_inputs], placeholders[num_inputs:]
    _check_static(gm, target)
    missing = [n.name for n in weight_nodes if n.name not in weights]
    if missing:
        raise UnsupportedOpError(f"partition reads weights {missing} that were not given")
    times: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        times[name] = round(time.perf_counter() - start, 4)
        return result

    plan = timed("library_dispatch", target.dispatch.plan, gm)
    plan_reports = {}
    for plan_stage in target.plan_stages():
        plan, plan_reports[plan_stage.report_key] = timed(plan_stage.name, plan_stage.run, plan,
                                                          frozenset(weight_nodes))
    mod, node_report = timed("convert", to_relax, gm, target.dispatch, plan, ENTRY, weights, target.converters())
    tvm_target = tvm.target.Target(target_json)
    with tvm_target:
        mod = timed("fuse_norm", stage("fuse_norm", target), mod)
        fused = Counter(str(f.attrs[FUSED]) for _, f in mod.functions_items()
                        if isinstance(f, relax.Function) and f.attrs is not None and FUSED in f.attrs)
        for name in ("legalize", "fuse"):
            mod = timed(name, stage(name, target), mod)
        tuned = None
        if target.tunes():
            mod, tuned = timed("tune", target.tune, mod, tvm_target)
        # Already-scheduled kernels (tirx.is_scheduled, set by the tune stage) are skipped here.
        mod = timed("schedule", stage("schedule", target), mod)
    kernels = {gv.name_hint: func for gv, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}
    lower_and_finalize = tvm.transform.Sequential([stage("dataflow_lower", target), stage("finalize", target)])
    executable = timed("codegen", lambda: tvm.compile(mod, target=tvm_target, relax_pipeline=lower_and_finalize))
    library = timed("export", _export, executable)

    outputs = [n.meta["val"] for n in _output_nodes(gm)]
    # bf16 weights the runtime packs once at load for its bf16 linears (tvm_dispatch.pack_bf16_weights)
    packed = sorted({args[1].name for rule, args in plan.values()
                     if rule.function in tvm_dispatch.PACKED_BF16_FUNCTIONS and args[1] in weight_nodes
                     and args[1].meta["val"].dtype == torch.bfloat16})
    # f32 weights it packs once at load for MKL's sgemm or oneDNN's inner product at the GEMM's row count
    # (tvm_dispatch.F32_PACKINGS), by spec field
    packed_f32 = {field: rows for field, (functions, _) in tvm_dispatch.F32_PACKINGS.items()
                  if (rows := _packed_at_rows(plan, weight_nodes, functions))}
    spec = {
        "format": FORMAT,
        "entry": ENTRY,
        "tvm_version": tvm_version(),
        "target": target_json,
        **target.spec_fields(target_json),
        "dispatch_abi": target.dispatch.abi,
        "inputs": [_tensor_spec(n.meta["val"], n.name) for n in inputs],
        "weights": [n.name for n in weight_nodes],
        "weight_types": [_tensor_spec(n.meta["val"]) for n in weight_nodes],  # checked against the weights on load
        "outputs": [_tensor_spec(v) for v in outputs],
        **({"packed_bf16_weights": packed} if packed else {}),
        **packed_f32,
        "report": {
            "nodes": node_report,
            "dispatched": dict(Counter(r["function"] for r in node_report if r["how"] == "dispatch")),
            **plan_reports,
            "fused_patterns": dict(fused),
            # "tuning_database": the schedule is a tuning record's (MetaSchedule's, or kiln's rule measured faster)
            "kernels": [{"name": name, "schedule": _schedule_name(name, func, tuned),
                         **({"tuning_database": True} if tuned is not None and name in tuned.applied else {})}
                        for name, func in sorted(kernels.items())],
            "stage_seconds": times,
        },
    }
    if tuned is not None:
        spec["report"]["tuning"] = tuned.report()
    return TvmLowered(library, spec, {name: func.script() for name, func in kernels.items()}, tuned)


def _packed_at_rows(plan, weight_nodes, functions) -> list[list]:
    """``[weight name, rows]`` of each planned call of ``functions`` on a weight, rows = its input's row count."""
    return [list(p) for p in sorted({(args[1].name, math.prod(args[0].meta["val"].shape[:-1]))
                                     for rule, args in plan.values()
                                     if rule.function in functions and args[1] in weight_nodes})]


def _schedule_name(name: str, func: tirx.PrimFunc, tuned) -> str | None:
    """The rule that scheduled ``func``, else ``meta_schedule`` when its schedule came from the tuning database.

    A database record may be kiln's own rule (measured faster than every candidate):
    it replays with the rule's annotation and is reported under the rule's name.
    """
    rule = applied_rule(func)
    if rule is None and tuned is not None and name in tuned.applied:
        return META_SCHEDULE
    return rule


def _check_static(gm: fx.GraphModule, target: TvmTarget) -> None:
    # Relax exports symbolic shapes, but tvm.compile of the result fails on this
    # TVM; a fixed set of shapes (one partition per bucket) is the supported way.
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not all(isinstance(s, int) for s in val.shape):
            raise UnsupportedOpError(
                f"node {node.name} has dynamic shape {list(val.shape)}; the TVM {target.name} backend compiles static "
                "shapes only: export one partition per shape bucket (e.g. sequence lengths 64/128/256)")


def _output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return list(out.args[0])


def _tensor_spec(val: torch.Tensor, name: str | None = None) -> dict:
    spec = {"shape": list(val.shape), "dtype": dtype_name(val.dtype)}  # kiln's names, as the whole manifest
    return {"name": name, **spec} if name else spec


def _export(executable: relax.VMExecutable) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lib.so")
        executable.export_library(path)
        with open(path, "rb") as f:
            return f.read()
