"""The manifest checked whole at load: its structure by JSON Schema, then what ties its parts together.

A manifest is data from disk. Without these checks a missing or ill-typed
field surfaced as a ``KeyError`` deep in a loader, a bad schedule at the first
call and a weight of the wrong shape inside TVM. :func:`check_structure`
validates every field the runtime reads against :data:`SCHEMA` (both kernel
formats' specs included); :func:`check_consistency` then checks, with the
weights loaded, that every name resolves: partition inputs are model inputs or
earlier partitions' outputs (so the schedule is in order and acyclic), weights
and aliases exist with the shapes and dtypes the specs declare, and torch
graphs call only admitted ops. Every failure is an ArtifactError naming the
field, before any kernel is loaded.
"""
from __future__ import annotations

import torch
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ..errors import ArtifactError
from ..ir.chain import chain_dependencies
from ..ir.meta import DTYPES_BY_NAME, dtype_from_name
from ..ir.serialize import check_graph_ops
from ..ir.signature import _load_treespec
from .kernels import FORMATS

_NAME = {"type": "string", "minLength": 1}
_NAMES = {"type": "array", "items": _NAME}
_UNIQUE_NAMES = {**_NAMES, "uniqueItems": True}
_SHAPE = {"type": "array", "items": {"type": ["integer", "string"]}}
_STATIC_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_KILN_TYPE = {"type": "object", "required": ["shape", "dtype"],
              "properties": {"shape": _SHAPE, "dtype": {"enum": list(DTYPES_BY_NAME)}}}
_STATIC_KILN_TYPE = {"type": "object", "required": ["shape", "dtype"],
                     "properties": {"shape": _STATIC_SHAPE, "dtype": {"enum": list(DTYPES_BY_NAME)}}}

# A graph argument: a scalar, a one-key object ({"node": NAME}, {"dtype": "f32"}, ...)
# or a list of those, nested at most three deep (kiln writes two: output tuples, index lists).
_ARG_OBJECT = {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
               "properties": {key: {"type": "string"} for key in
                              ("node", "float", "dtype", "device", "layout", "memory_format")}}
_ARG_LEAF = {"anyOf": [{"type": ["null", "boolean", "number", "string"]}, _ARG_OBJECT]}
_ARG = _ARG_LEAF
for _ in range(3):
    _ARG = {"anyOf": [_ARG_LEAF, {"type": "array", "items": _ARG}]}

_NODE = {
    "type": "object", "required": ["name", "op"],
    "properties": {"name": _NAME, "op": {"enum": ["placeholder", "call_function", "output"]},
                   "target": {"type": "string"}, "args": {"type": "array", "items": _ARG},
                   "kwargs": {"type": "object", "additionalProperties": _ARG},
                   "types": {"type": "array", "items": _KILN_TYPE}},
    "if": {"properties": {"op": {"const": "call_function"}}}, "then": {"required": ["target"]},
}
_TORCH_GRAPH_SPEC = {
    "type": "object", "required": ["graph"],
    "properties": {"graph": {"type": "object", "required": ["nodes"],
                             "properties": {"nodes": {"type": "array", "items": _NODE}}}},
}
_NAMES_AT_ROWS = {"type": "array", "items": {
    "type": "array", "prefixItems": [_NAME, {"type": "integer", "minimum": 1}], "minItems": 2, "maxItems": 2}}
_TVM_VM_SPEC = {
    "type": "object", "required": ["format", "entry", "inputs", "weights", "outputs"],
    "properties": {
        "format": {"const": "tvm-vm"}, "entry": _NAME,
        "inputs": {"type": "array", "items": {**_STATIC_KILN_TYPE, "required": ["name", "shape", "dtype"]}},
        "weights": _UNIQUE_NAMES,
        "weight_types": {"type": "array", "items": _STATIC_KILN_TYPE},  # written since kiln 0.1 (optional)
        "outputs": {"type": "array", "items": _STATIC_KILN_TYPE},
        # linear weights the runtime packs once at load (tvm_dispatch): bf16 by name, f32 (for MKL, for oneDNN)
        # as [name, rows]
        "packed_bf16_weights": _UNIQUE_NAMES,
        "packed_f32_weights": _NAMES_AT_ROWS,
        "packed_onednn_f32_weights": _NAMES_AT_ROWS,
    },
}

_NPU_EMULATED_SPEC = {
    "type": "object", "required": ["graph", "inputs", "digest", "modeled"],
    "properties": {
        "graph": _TORCH_GRAPH_SPEC["properties"]["graph"],
        "inputs": {"type": "array", "items": {**_STATIC_KILN_TYPE, "required": ["name", "shape", "dtype"]}},
        "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        # the cost model's device time (kiln/backends/npu/cost.py), never a measurement
        "modeled": {"type": "object", "required": ["execute_us", "build_us"],
                    "properties": {"execute_us": {"type": "number", "minimum": 0},
                                   "build_us": {"type": "number", "minimum": 0}}},
    },
}


def _when_format(name: str, spec: dict, files: dict) -> dict:
    return {"if": {"properties": {"format": {"const": name}}, "required": ["format"]},
            "then": {"properties": {"spec": spec, "files": files}}}


_TASK = {
    "type": "object", "required": ["name", "format", "queue", "after", "inputs", "outputs", "weights", "spec", "files"],
    "properties": {
        "name": _NAME, "backend": {"type": "string"}, "format": {"type": "string"},
        "queue": _NAME, "after": _UNIQUE_NAMES,
        "inputs": _NAMES, "outputs": _UNIQUE_NAMES, "weights": _UNIQUE_NAMES, "spec": {"type": "object"},
        "files": _UNIQUE_NAMES, "compiler_files": _UNIQUE_NAMES, "report": {"type": "object"},
    },
    "allOf": [
        _when_format("torch-graph", _TORCH_GRAPH_SPEC, {"maxItems": 0}),
        _when_format("tvm-vm", _TVM_VM_SPEC, {"minItems": 1, "maxItems": 1}),  # the library
        _when_format("npu-emulated", _NPU_EMULATED_SPEC, {"maxItems": 0}),
    ],
}
_OUTPUT = {"type": "object", "minProperties": 1, "maxProperties": 1,
           "properties": {"value": _NAME, "literal": {}}, "additionalProperties": False}
_CONTROL_VALUE = {"type": ["integer", "string"]}
_CONTROL = {
    "type": "object", "required": ["name", "dtype", "default"], "additionalProperties": False,
    "properties": {
        "name": _NAME, "dtype": {"enum": ["i64", "i32"]}, "default": _CONTROL_VALUE,
        "min": {"type": "integer"}, "max": {"type": "integer"},  # an integer range, both ends included
        "values": {"type": "array", "items": _CONTROL_VALUE, "minItems": 1, "uniqueItems": True},  # or an enum
    },
    "oneOf": [{"required": ["min", "max"], "not": {"required": ["values"]}},
              {"required": ["values"], "not": {"anyOf": [{"required": ["min"]}, {"required": ["max"]}]}}],
}
_SIGNATURE = {"type": "object", "required": ["inputs", "in_spec", "out_spec"], "properties": {
    "inputs": {"type": "array", "items": {**_KILN_TYPE, "required": ["name", "shape", "dtype"],
                                          "properties": {**_KILN_TYPE["properties"], "name": _NAME}}},
    "in_spec": {"type": "string"}, "out_spec": {"type": "string"}}}
_STEP_TASK = {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0}, _NAME], "minItems": 2,
              "maxItems": 2}
_CHAIN = {
    "type": "object", "required": ["carry", "orders"],
    "properties": {
        # [output index, input name]: that output of a step is that input of the next
        "carry": {"type": "array", "items": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0},
                                                                                _NAME], "minItems": 2, "maxItems": 2}},
        # chain length -> queue -> [[step, task], ...]
        "orders": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": "^[1-9][0-9]*$"},
                   "additionalProperties": {"type": "object", "additionalProperties": {"type": "array",
                                                                                       "items": _STEP_TASK}}},
        "costs": {"type": "object"}, "makespans": {"type": "object"},  # what ScheduleBlocks used: for tools only
    },
}
_PROGRAM = {
    "type": "object", "required": ["signature", "tasks", "outputs"],
    "properties": {
        "signature": _SIGNATURE,
        "tasks": {"type": "array", "items": _TASK},
        "outputs": {"type": "array", "items": _OUTPUT},
        "controls": {"type": "array", "items": _CONTROL},
        "weight_sources": {"type": "object", "additionalProperties": {"type": "string"}},
        "passes": {"type": "array"},
        "fallbacks": {"type": "array"},
        # chained runs of this program (kiln/runtime/chain.py): the carried state and the out-of-order
        # task orders per chain length, written by ScheduleBlocks (kiln/passes/schedule_blocks.py)
        "chain": _CHAIN,
        # the PyTorch intra-op threads a call runs with (CompileOptions.intra_op_threads); what was measured
        "intra_op_threads": {"type": "integer", "minimum": 1},
        "intra_op_threads_measured_ms": {"type": "object"},
        # room for multi-process programs: the worker group that runs this program, and its rank in it
        "group": {"type": "object", "required": ["name", "rank", "size"], "properties": {
            "name": _NAME, "rank": {"type": "integer", "minimum": 0}, "size": {"type": "integer", "minimum": 1}}},
    },
}
PROGRAM_NAME = "^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
QUEUE_NAME = "^[a-z]+[0-9]+$"  # cpu0, npu0, cuda1: a device kind and an index

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "format_version", "target", "programs", "default_program", "queues", "files",
                 "manifest_sha256"],
    "properties": {
        "format": {"const": "kiln-artifact"}, "format_version": {"type": "integer"},
        "kiln_version": {"type": ["string", "null"]}, "torch_version": {"type": ["string", "null"]},
        "tvm_version": {"type": ["string", "null"]}, "target": {"type": "string"},
        "model": {"type": ["string", "null"]},
        "programs": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": PROGRAM_NAME},
                     "additionalProperties": _PROGRAM},
        "default_program": _NAME,
        "queues": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": QUEUE_NAME},
                   "additionalProperties": {"type": "object", "required": ["device"],
                                            "properties": {"device": _NAME}}},
        # an LLM (kiln/llm/runtime.py): which program prefills each prompt-length bucket, or the chunk program
        # with its outputs' names and carried state (output -> the input it feeds next chunk), and which decodes
        "llm": {"type": "object", "required": ["prefill", "decode"], "additionalProperties": False, "properties": {
            "prefill": {"type": "object", "propertyNames": {"pattern": "^[1-9][0-9]*$"},
                        "additionalProperties": _NAME},
            "chunk": {"type": "object", "required": ["size", "program", "outputs", "carry"],
                      "additionalProperties": False, "properties": {
                          "size": {"type": "integer", "minimum": 1}, "program": _NAME,
                          "outputs": {"type": "array", "minItems": 1, "items": _NAME},
                          "carry": {"type": "object", "additionalProperties": _NAME}}},
            "decode": _NAME}},
        # a control whose value names the program a call runs (the bit-width plans of a nested-quantized model)
        "selector": {"type": "object", "required": ["name", "values", "default"], "additionalProperties": False,
                     "properties": {"name": _NAME, "values": {"type": "array", "minItems": 1, "uniqueItems": True,
                                                              "items": _NAME},
                                    "default": _NAME}},
        "quantization": {"type": "object"},  # quantize_nested's report (plans, bytes, errors): read by tools only
        "weight_aliases": {"type": "object", "additionalProperties": _NAME},
        "files": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["bytes", "sha256"],
            "properties": {"bytes": {"type": "integer", "minimum": 0},
                           "sha256": {"type": "string"}}}},  # a wrong one is simply no match
        "manifest_sha256": {"type": "string"},
        "manifest_signature": {"type": "object"},
    },
}
_VALIDATOR = Draft202012Validator(SCHEMA)
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def check_structure(manifest: dict, where: str) -> None:
    """Raise ArtifactError naming the field if ``manifest`` does not match :data:`SCHEMA`."""
    error = best_match(_VALIDATOR.iter_errors(manifest))
    if error is None:
        return
    field = _field(error.absolute_path)
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        raise ArtifactError(f"{where}: field {_field([*error.absolute_path, missing])} is missing")
    if error.validator == "type":
        expected = error.validator_value if isinstance(error.validator_value, str) else \
            " or ".join(error.validator_value)
        raise ArtifactError(f"{where}: field {field} must be of type {expected}, "
                            f"not {_JSON_TYPES.get(type(error.instance), type(error.instance).__name__)}")
    message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
    raise ArtifactError(f"{where}: field {field}: {message}")


def _field(path) -> str:
    """``partitions[0].files``, ``files["weights.safetensors"]``: a path into the manifest, as Python would write it."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(the manifest itself)"


# The devices whose queues this runtime runs (a worker thread each); an artifact naming another is refused.
# "npu" is the emulated NPU (kiln/runtime/kernels/npu_emulated.py): its queue's worker computes on this CPU.
DEVICES = ("cpu", "npu")


def check_consistency(manifest: dict, weights: dict[str, torch.Tensor], where: str) -> None:
    """Raise ArtifactError unless every name in a structurally valid ``manifest`` resolves (see the module doc)."""
    programs = manifest["programs"]
    if manifest["default_program"] not in programs:
        raise ArtifactError(f"{where}: field default_program names program {manifest['default_program']!r}, "
                            f"which is not in field programs (it has {', '.join(sorted(programs))})")
    for name, queue in manifest["queues"].items():
        if queue["device"] not in DEVICES:
            raise ArtifactError(f"{where}: queue {name!r} runs on device {queue['device']!r}, which this runtime "
                                f"has no worker for (known: {', '.join(DEVICES)})")
    for name, program in programs.items():
        _check_program(manifest, program, weights, f"{where}: programs[{name!r}]")
    if "llm" in manifest:
        llm = manifest["llm"]
        chunk = [llm["chunk"]["program"]] if "chunk" in llm else []
        for name in [llm["decode"], *llm["prefill"].values(), *chunk]:
            if name not in programs:
                raise ArtifactError(f"{where}: field llm names program {name!r}, which is not in field programs "
                                    f"(it has {', '.join(sorted(programs))})")
        if not llm["prefill"] and not chunk:
            raise ArtifactError(f"{where}: field llm has no prefill program (llm.prefill is empty and there is no "
                                "llm.chunk)")
    if "selector" in manifest:
        _check_selector(manifest["selector"], programs, where)


def _check_selector(selector: dict, programs: dict, where: str) -> None:
    """The selector's values are programs taking the same inputs and controls; its default is one of them."""
    for name in selector["values"]:
        if name not in programs:
            raise ArtifactError(f"{where}: field selector names program {name!r}, which is not in field programs "
                                f"(it has {', '.join(sorted(programs))})")
    if selector["default"] not in selector["values"]:
        raise ArtifactError(f"{where}: field selector.default {selector['default']!r} is not one of its values "
                            f"{selector['values']}")
    first, *others = selector["values"]
    for name in others:
        for key in ("signature", "controls"):
            if programs[name].get(key) != programs[first].get(key):
                raise ArtifactError(f"{where}: the programs of field selector differ in their {key}: {first!r} and "
                                    f"{name!r} (a call must be able to run any of them)")


def _check_program(manifest: dict, program: dict, weights: dict[str, torch.Tensor], where: str) -> None:
    for key in ("in_spec", "out_spec"):
        try:
            _load_treespec(program["signature"][key])
        except ArtifactError as e:
            raise ArtifactError(f"{where}: field signature.{key}: {e}") from None
    inputs = [i["name"] for i in program["signature"]["inputs"]]
    controls = [c["name"] for c in program.get("controls", ())]
    if len(set(inputs + controls)) != len(inputs) + len(controls):
        raise ArtifactError(f"{where}: input and control names must be unique; they are {inputs + controls}")
    for i, control in enumerate(program.get("controls", ())):
        _check_control(control, f"{where}.controls[{i}] ({control['name']!r})")
    tasks = program["tasks"]
    by_name: dict[str, int] = {}
    for i, entry in enumerate(tasks):
        if entry["name"] in by_name:
            raise ArtifactError(f"{where}: tasks[{i}]: task name {entry['name']!r} is used twice")
        by_name[entry["name"]] = i
    producer = {n: None for n in (*inputs, *controls)}  # value -> the task that computes it (None: an input)
    for i, entry in enumerate(tasks):
        at = f"{where}.tasks[{i}] ({entry['name']!r})"
        if entry["queue"] not in manifest["queues"]:
            raise ArtifactError(f"{at} runs on queue {entry['queue']!r}, which field queues does not declare "
                                f"(it declares {', '.join(sorted(manifest['queues']))})")
        if unknown := [a for a in entry["after"] if a not in by_name]:
            raise ArtifactError(f"{at}: field after names tasks {unknown[:5]} that this program does not have")
        if redefined := [o for o in entry["outputs"] if o in producer]:
            raise ArtifactError(f"{at}: outputs {redefined[:5]} are already defined by an input, a control or "
                                "another task")
        producer.update(dict.fromkeys(entry["outputs"], entry["name"]))
    order = topological_order(tasks, where)
    ancestors: dict[str, set[str]] = {}
    for i in order:
        entry = tasks[i]
        at = f"{where}.tasks[{i}] ({entry['name']!r})"
        ancestors[entry["name"]] = set(entry["after"]).union(*(ancestors[a] for a in entry["after"]))
        if entry["format"] not in FORMATS:
            raise ArtifactError(f"{at} has kernel format {entry['format']!r}, which this runtime cannot load "
                                f"(known: {', '.join(sorted(FORMATS))})")
        for name in entry["inputs"]:
            if name not in producer:
                raise ArtifactError(f"{at}: input {name!r} is neither a program input, a control nor an output of "
                                    "a task")
            if producer[name] is not None and producer[name] not in ancestors[entry["name"]]:
                raise ArtifactError(f"{at}: input {name!r} is computed by task {producer[name]!r}, which field "
                                    "after does not make it wait for")
        if missing := [w for w in entry["weights"] if w not in weights]:
            raise ArtifactError(f"{at} reads weights missing from weights.safetensors: {missing[:5]}")
        for name in (*entry["files"], *entry.get("compiler_files", ())):
            if name not in manifest["files"]:
                raise ArtifactError(f"{at}: file {name!r} is not listed in field files")
        _CHECKS[entry["format"]](entry, weights, at)
    for i, out in enumerate(program["outputs"]):
        if "value" in out and out["value"] not in producer and out["value"] not in weights:
            raise ArtifactError(f"{where}.outputs[{i}] is {out['value']!r}, which is neither a program input, "
                                "a task's output nor a weight")
    if "chain" in program:
        _check_chain(program, producer, where)


def _check_chain(program: dict, producer: dict, where: str) -> None:
    """The chain field: carried outputs are task outputs feeding real inputs; every order runs each task once, on
    its queue, and cannot deadlock (a queue waiting on a task that waits on it)."""
    at = f"{where}: field chain"
    chain = program["chain"]
    inputs = {i["name"] for i in program["signature"]["inputs"]}
    outputs = program["outputs"]
    carried: dict[str, str] = {}
    for index, name in chain["carry"]:
        if index >= len(outputs) or "value" not in outputs[index] or producer.get(outputs[index]["value"]) is None:
            raise ArtifactError(f"{at}.carry: output {index} is not a value a task computes")
        if name not in inputs or name in carried:
            raise ArtifactError(f"{at}.carry: {name!r} is not an input of the program, or is carried twice")
        carried[name] = producer[outputs[index]["value"]]
    tasks = {t["name"]: t for t in program["tasks"]}
    for k, per_queue in chain["orders"].items():
        steps = int(k)
        where_k = f"{at}.orders[{k!r}]"
        deps = chain_dependencies(program["tasks"], outputs, chain["carry"], steps)
        want = set(deps)
        seen = set()
        for queue, order in per_queue.items():
            for i, name in order:
                if (i, name) not in want or (i, name) in seen:
                    raise ArtifactError(f"{where_k}: [{i}, {name!r}] is not a task of a {steps}-step chain, or runs "
                                        "twice")
                if tasks[name]["queue"] != queue:
                    raise ArtifactError(f"{where_k}: task {name!r} runs on queue {tasks[name]['queue']!r}, not "
                                        f"{queue!r}")
                seen.add((i, name))
        if seen != want:
            raise ArtifactError(f"{where_k}: {len(want - seen)} tasks of the chain are in no queue's order")
        # run the orders as the runtime would, heads first: if no queue can move, they deadlock
        done: set = set()
        heads = {q: 0 for q in per_queue}
        while len(done) < len(want):
            moved = False
            for q, order in per_queue.items():
                while heads[q] < len(order):
                    i, name = order[heads[q]]
                    if not all(d in done for d in deps[(i, name)]):
                        break
                    done.add((i, name))
                    heads[q] += 1
                    moved = True
            if not moved:
                raise ArtifactError(f"{where_k}: the queues' orders deadlock (each waits on a task another has "
                                    "not reached)")


def topological_order(tasks: list[dict], where: str) -> list[int]:
    """The tasks' indices in an order that respects every ``after`` (list order among ready tasks).

    Raises ArtifactError naming a cycle if there is one.
    """
    index = {t["name"]: i for i, t in enumerate(tasks)}
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    order: list[int] = []
    for root in range(len(tasks)):
        if root in state:
            continue
        stack = [(root, iter(tasks[root]["after"]))]
        state[root] = 1
        while stack:
            i, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                state[i] = 2
                order.append(i)
                continue
            j = index[dep]
            if state.get(j) == 1:
                path = [tasks[k]["name"] for k, _ in stack]
                cycle = path[path.index(dep):] + [dep]
                raise ArtifactError(f"{where}: the tasks' dependencies form a cycle: "
                                    + " -> ".join(reversed(cycle)) + " (field after)")
            if j not in state:
                state[j] = 1
                stack.append((j, iter(tasks[j]["after"])))
    return order


def _check_control(control: dict, at: str) -> None:
    if "values" in control:
        allowed = control["values"]
        if any(isinstance(v, bool) for v in allowed) or len({type(v) for v in allowed}) != 1:
            raise ArtifactError(f"{at}: field values must be all integers or all strings")
    elif control["min"] > control["max"]:
        raise ArtifactError(f"{at}: min {control['min']} is more than max {control['max']}")
    if not control_allows(control, control["default"]):
        raise ArtifactError(f"{at}: its default {control['default']!r} is not one of its allowed values "
                            f"({describe_allowed(control)})")


def control_allows(control: dict, value) -> bool:
    """Whether ``value`` is one of the allowed values of the control ``control`` (a manifest entry)."""
    if "values" in control:
        return any(type(value) is type(v) and value == v for v in control["values"])
    return isinstance(value, int) and not isinstance(value, bool) and control["min"] <= value <= control["max"]


def describe_allowed(control: dict) -> str:
    if "values" in control:
        return "one of " + ", ".join(repr(v) for v in control["values"])
    return f"an integer from {control['min']} to {control['max']}"


def _check_torch_graph(entry: dict, weights: dict[str, torch.Tensor], at: str) -> None:
    nodes = entry["spec"]["graph"]["nodes"]
    try:
        check_graph_ops(entry["spec"]["graph"])
    except ArtifactError as e:
        raise ArtifactError(f"{at}: {e}") from None
    placeholders = [n for n in nodes if n["op"] == "placeholder"]
    if len(placeholders) != len(entry["inputs"]) + len(entry["weights"]):
        raise ArtifactError(f"{at}: its graph takes {len(placeholders)} inputs, but the partition names "
                            f"{len(entry['inputs'])} inputs and {len(entry['weights'])} weights")
    outputs = [n for n in nodes if n["op"] == "output"]
    returned = (outputs[0].get("args") or [None])[0] if outputs == nodes[-1:] else None
    if not isinstance(returned, list) or len(returned) != len(entry["outputs"]):
        raise ArtifactError(f"{at}: its graph must end in one output node returning a list of "
                            f"{len(entry['outputs'])} values (one per partition output)")
    for name, node in zip(entry["weights"], placeholders[len(entry["inputs"]):]):
        if len(node.get("types", ())) == 1:
            (declared,) = node["types"]
            _check_weight(at, name, weights[name], declared["shape"], dtype_from_name(declared["dtype"]))


def _check_tvm_vm(entry: dict, weights: dict[str, torch.Tensor], at: str) -> None:
    spec = entry["spec"]
    if len(spec["inputs"]) != len(entry["inputs"]) or len(spec["outputs"]) != len(entry["outputs"]):
        raise ArtifactError(f"{at}: its TVM library takes {len(spec['inputs'])} inputs and returns "
                            f"{len(spec['outputs'])} outputs; the partition names {len(entry['inputs'])} and "
                            f"{len(entry['outputs'])}")
    if spec["weights"] != entry["weights"]:
        raise ArtifactError(f"{at}: field spec.weights does not list the partition's weights in order")
    # Dtype names were checked against kiln's (DTYPES_BY_NAME) with the schema.
    for name, declared in zip(spec["weights"], spec.get("weight_types", ())):
        _check_weight(at, name, weights[name], declared["shape"], dtype_from_name(declared["dtype"]))
    packed = [("packed_bf16_weights", name) for name in spec.get("packed_bf16_weights", ())] + [
        (field, name) for field in ("packed_f32_weights", "packed_onednn_f32_weights")
        for name, _ in spec.get(field, ())]
    for field, name in packed:
        if name not in entry["weights"]:
            raise ArtifactError(f"{at}: field spec.{field} names {name!r}, which is not one of the partition's "
                                "weights")


def _check_weight(at: str, name: str, tensor: torch.Tensor, shape, dtype: torch.dtype) -> None:
    if all(isinstance(d, int) for d in shape) and (list(tensor.shape) != list(shape) or tensor.dtype != dtype):
        raise ArtifactError(f"{at}: weight {name!r} in weights.safetensors is {tensor.dtype} {list(tensor.shape)}; "
                            f"the partition was compiled for {dtype} {list(shape)}")


def _check_npu_emulated(entry: dict, weights: dict[str, torch.Tensor], at: str) -> None:
    from .kernels.npu_emulated import check_entry

    _check_torch_graph(entry, weights, at)  # the same JSON graph, with the NPU's own checks on top
    check_entry(entry, at)


_CHECKS = {"torch-graph": _check_torch_graph, "tvm-vm": _check_tvm_vm, "npu-emulated": _check_npu_emulated}
