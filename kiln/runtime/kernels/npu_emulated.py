"""The ``npu-emulated`` kernel format: a static-shape NPU graph, run on this CPU with exact integer arithmetic.

What the ``npu`` backend (``kiln/backends/npu/``) lowers: a JSON graph of the
ops a mobile NPU runs (:data:`NPU_OPS`: ``kiln::int8_linear`` and reshapes),
the static shapes and dtypes of its inputs, the graph's digest, and the cost
model's *modeled* time per call and per graph build. The graph runs through
the ops' own CPU kernels: ``kiln::int8_linear`` quantizes with one static
scale and accumulates in int32 exactly, so the result is bitwise what any
kernel of the op computes (on a device too, up to its float rescale). Each
bound weight an ``int8_linear`` multiplies by is prepacked once, at load, for
the op's oneDNN kernel (``prepack_int8_linear_weight``; where the CPU has
VNNI/AMX), bitwise equal to its ``torch._int_mm`` reference.

Each call checks its inputs against the static shapes (a real NPU graph
cannot take another shape) and counts itself in ``kiln.runtime.npu``: the
first call of a ``(digest, input shapes)`` key is a graph build, later ones
build-cache hits. :func:`check_entry` is the load-time check the manifest
runs (``kiln/runtime/manifest.py``): ops in :data:`NPU_OPS` only, input
types matching the graph's, the digest matching the graph.
"""
from __future__ import annotations

import hashlib
import json

import torch

from ...errors import ArtifactError, InputMismatchError
from ...ir.meta import dtype_from_name, dtype_name
from ...ir.ops import prepack_int8_linear_weight
from ...ir.serialize import graph_from_json
from .. import npu

FORMAT = "npu-emulated"
INT8_LINEAR = torch.ops.kiln.int8_linear.default

# The NPU's op table, by the JSON graph's target name: what it is, for messages. The
# ``npu`` backend places exactly these ops (kiln/backends/npu/ops.py) and a loaded graph
# may call nothing else.
NPU_OPS: dict[str, str] = {
    "kiln.int8_linear.default": "int8 x int8 matmul, int32 accumulation, per-tensor static activation scale",
    "aten.view.default": "reshape (no data movement)",
    "aten.reshape.default": "reshape (no data movement)",
}


def graph_digest(graph: dict) -> str:
    """sha256 of a JSON graph in canonical form: the NPU graph's identity in the build cache."""
    text = json.dumps(graph, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_entry(entry: dict, at: str) -> None:
    """Raise ArtifactError unless ``entry`` (a task whose structure the schema checked) is an NPU graph this runtime runs."""
    spec = entry["spec"]
    nodes = spec["graph"]["nodes"]
    for node in nodes:
        if node["op"] == "call_function" and node["target"] not in NPU_OPS:
            raise ArtifactError(f"{at}: node {node['name']} calls {node['target']}, which the NPU does not run "
                                f"(its ops: {', '.join(sorted(NPU_OPS))})")
    if len(spec["inputs"]) != len(entry["inputs"]):
        raise ArtifactError(f"{at}: field spec.inputs declares {len(spec['inputs'])} static input types; the "
                            f"partition names {len(entry['inputs'])} inputs")
    placeholders = [n for n in nodes if n["op"] == "placeholder"]
    for declared, node, name in zip(spec["inputs"], placeholders, entry["inputs"]):
        if declared["name"] != name:
            raise ArtifactError(f"{at}: field spec.inputs names {declared['name']!r} where the partition's input "
                                f"is {name!r}")
        types = node.get("types") or []
        if len(types) != 1 or list(types[0]["shape"]) != list(declared["shape"]) \
                or types[0]["dtype"] != declared["dtype"]:
            raise ArtifactError(f"{at}: input {name!r} is declared {declared['dtype']}{declared['shape']} in field "
                                f"spec.inputs, but its graph placeholder is typed {types}")
    if graph_digest(spec["graph"]) != spec["digest"]:
        raise ArtifactError(f"{at}: field spec.digest does not match its graph (the NPU graph was edited after "
                            "compilation)")


def _prepack_weights(gm: torch.fx.GraphModule, bound: list[torch.Tensor], n_inputs: int) -> None:
    """Prepack, once at load, each bound weight an ``int8_linear`` multiplies by (``prepack_int8_linear_weight``:
    the op's prepacked kernel then runs for it, bitwise equal to its reference kernel)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight_of = {node: bound[i - n_inputs] for i, node in enumerate(placeholders) if i >= n_inputs}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is INT8_LINEAR:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if weight in weight_of:
                prepack_int8_linear_weight(weight_of[weight])


def load(entry: dict, files, weights: dict[str, torch.Tensor]):
    spec = entry["spec"]
    gm = graph_from_json(spec["graph"])
    bound = [weights[name] for name in entry["weights"]]
    declared = [(i["name"], tuple(i["shape"]), dtype_from_name(i["dtype"])) for i in spec["inputs"]]
    _prepack_weights(gm, bound, len(declared))
    key = (spec["digest"], tuple(shape for _, shape, _ in declared))
    build_us = float(spec["modeled"]["build_us"])
    execute_us = float(spec["modeled"]["execute_us"])
    task = entry["name"]

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(declared):
            raise InputMismatchError(f"npu task {task}: got {len(inputs)} inputs, its graph takes {len(declared)}")
        for x, (name, shape, dtype) in zip(inputs, declared):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.dtype != dtype:
                got = f"{dtype_name(x.dtype)}{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputMismatchError(
                    f"npu task {task}: input {name!r} is {got}, but its NPU graph was built for the static "
                    f"type {dtype_name(dtype)}{list(shape)} (an NPU graph runs one static shape: compile for this "
                    "shape, or cut the input into chunks of it)")
        npu.record_call(key, build_us, execute_us)
        return gm(*inputs, *bound)

    return run
