"""ONNX Runtime and OpenVINO as peers of kiln in ``compiled_vs_eager.py`` (the ``bench`` extra).

Each peer gets the module eager runs (the same weights) and the same example inputs:

- ``ort``: ``torch.onnx.export(dynamo=True)``, then an onnxruntime ``InferenceSession`` on the
  CPUExecutionProvider with ``ORT_ENABLE_ALL`` and intra-op threads = torch's thread count. Its
  threads keep spinning ~30 ms after each call and slow whatever runs next, so the benchmark times it
  last in each round and pauses :data:`SETTLE_S` (untimed) after each of its calls.
- ``ov-f32``: ``openvino.convert_model``, compiled for "CPU" with ``INFERENCE_PRECISION_HINT=f32``.
- ``ov``: the same converted model at OpenVINO's default precision (bf16 on machines with AMX or
  AVX512-BF16); the precision it picked is read back from the compiled model (its hint, and the runtime
  precision of its GEMM-class layers).

Both OpenVINO peers run with ``INFERENCE_NUM_THREADS`` = torch's thread count and the LATENCY hint, and
share their input and output buffers with numpy (no copy per call). OpenVINO converts the ``nn.Module``
directly (a TorchScript trace) when it can, else the ``torch.export`` ExportedProgram (Llama: the direct
path has no rule for ``aten::diff``); which path worked is part of the peer's note. A peer whose package
is missing or whose export, conversion or first run fails becomes a one-line reason, never a traceback.

Fidelity against eager fp32, the same for every contender (:func:`fidelity`): max |diff| over all
outputs, and by the kind of model
- causal LM (``logits`` [batch, seq, vocab]): top-token agreement, the share of all positions (every
  position of a prefill, not only the last) whose argmax over the vocabulary is eager's;
- encoder (``last_hidden_state``): the lowest cosine over the batch between the attention-masked
  mean-pooled embeddings (sentence-transformers' pooling for all-MiniLM-L6-v2);
- classifier (``logits`` [batch, classes]): top-1 agreement.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

PEERS = ("ort", "ov-f32", "ov")
# Untimed pause after each call of these peers before the next contender starts (kiln.timing.rounds_ms).
SETTLE_S = {"ort": 0.1}
# Each peer's packages (import names) and the extra that installs them.
_NEEDS = {"ort": ("onnxruntime", "onnx", "onnxscript"), "ov-f32": ("openvino",), "ov": ("openvino",)}
# OpenVINO CPU layer types whose runtime precision is the one that matters for speed and accuracy: GEMMs, and
# the fused LLM nodes its bf16 path uses (LLMMLP: gate, up and down projections in one; QKVProjection; ScaledAttn).
# Attention fused into a generic "Subgraph" is not counted.
_GEMM_LAYERS = ("FullyConnected", "LLMMLP", "QKVProjection", "MatMul", "ScaledAttn", "Convolution")


@dataclass
class Peer:
    """One peer contender: ``run`` is the timed call; ``outputs`` one untimed call's outputs as torch tensors,
    in the order of eager's output leaves; ``note`` says how it was built (export path, precision)."""

    name: str
    run: Callable[[], object]
    outputs: Callable[[], list[torch.Tensor]]
    note: str
    precision: str = "f32"


@dataclass(frozen=True)
class Fidelity:
    """A contender's outputs against eager fp32: max |diff| over all outputs and one model-kind metric."""

    max_abs: float
    metric: str  # "top-token" | "cosine" | "top-1"
    value: float

    def __str__(self) -> str:
        shown = f"{self.value:.6f}" if self.metric == "cosine" else f"{100 * self.value:.1f}%"
        return f"{self.metric} {shown}"


def missing(name: str) -> str | None:
    """Why peer ``name`` cannot run here (a package of the ``bench`` extra is not installed), or None."""
    if name not in _NEEDS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    absent = [pkg for pkg in _NEEDS[name] if importlib.util.find_spec(pkg) is None]
    return f"not installed: {', '.join(absent)} (pip install -e '.[bench]')" if absent else None


def installed() -> list[str]:
    """The peers whose packages are installed (the benchmark's default ``--peers``)."""
    return [name for name in PEERS if missing(name) is None]


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A failure as one line: the exception type and the most telling line of its message (for a converter,
    the ops it has no rule or function for), at most ``limit`` characters."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch.onnx colours its messages
    message = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    telling = [line for line in lines
               if re.search(r"no conversion rule|no onnx function|not supported|unsupported", line, re.I)]
    text = (telling or lines or [""])[0].lstrip("- ")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summarize_precisions(hint: str, layers: Iterable[tuple[str, str]]) -> str:
    """What precision an OpenVINO compiled model runs in: its inference-precision ``hint`` and, for the
    GEMM-class layers among ``layers`` ((layer type, runtime precision) pairs from the runtime model),
    how many run in each precision, e.g. ``"bf16 (FullyConnected 5/5 bf16; LLMMLP 1/1 bf16)"``."""
    counts: dict[str, Counter] = {}
    for layer_type, precision in layers:
        if layer_type in _GEMM_LAYERS:
            counts.setdefault(layer_type, Counter())[precision] += 1
    parts = []
    for layer_type in _GEMM_LAYERS:
        if layer_type in counts:
            total = sum(counts[layer_type].values())
            parts.append(f"{layer_type} " + ", ".join(f"{n}/{total} {p}" for p, n in counts[layer_type].most_common()))
    return f"{hint} ({'; '.join(parts)})" if parts else hint


def top_token_agreement(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Share of positions (all but the last dimension) where ``logits``' argmax equals ``reference``'s."""
    if reference.shape != logits.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} differs from the reference's {tuple(reference.shape)}")
    return float((reference.argmax(-1) == logits.argmax(-1)).double().mean())


def embedding_cosine(reference: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Lowest cosine over the batch between mean-pooled embeddings of ``hidden`` and ``reference``
    ([batch, seq, dim]), pooled over the positions where ``mask`` ([batch, seq]) is non-zero."""
    if reference.shape != hidden.shape:
        raise ValueError(f"hidden shape {tuple(hidden.shape)} differs from the reference's {tuple(reference.shape)}")
    weights = torch.ones(reference.shape[:2], dtype=torch.float64) if mask is None else mask.to(torch.float64)
    weights = weights.unsqueeze(-1)

    def pool(x):
        return (x.double() * weights).sum(1) / weights.sum(1).clamp(min=1)
    return float(torch.nn.functional.cosine_similarity(pool(reference), pool(hidden), dim=-1).min())


def fidelity(reference, outputs: list[torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Fidelity:
    """``outputs`` (a contender's output leaves) against eager's output ``reference`` (a transformers
    ModelOutput): max |diff| over all leaves and the metric of the model's kind (see the module's doc)."""
    leaves = pytree.tree_leaves(reference)
    if len(leaves) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs, eager has {len(leaves)}")
    max_abs = 0.0
    for ref, out in zip(leaves, outputs):
        if ref.shape != out.shape:
            raise ValueError(f"output shape {tuple(out.shape)} differs from eager's {tuple(ref.shape)}")
        max_abs = max(max_abs, float((ref.double() - out.double()).abs().max()))

    def leaf(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        ref = reference[key]
        return ref, outputs[next(i for i, x in enumerate(leaves) if x is ref)]

    if "last_hidden_state" in reference:
        ref, out = leaf("last_hidden_state")
        mask = inputs[1] if len(inputs) > 1 and inputs[1].shape == ref.shape[:2] else None
        return Fidelity(max_abs, "cosine", embedding_cosine(ref, out, mask))
    if "logits" in reference:
        ref, out = leaf("logits")
        return Fidelity(max_abs, "top-token" if ref.dim() == 3 else "top-1", top_token_agreement(ref, out))
    raise ValueError(f"no fidelity metric for an output with fields {list(reference.keys())}")


def flat_outputs(result) -> list[torch.Tensor]:
    """A contender's return value (kiln's or torch's) as the list of its output tensors, in pytree order."""
    return [x for x in pytree.tree_leaves(result) if isinstance(x, torch.Tensor)]


class _AllOutputs(torch.nn.Module):
    """The model as eager runs it in the benchmark (no KV cache), returning all its output leaves as a
    tuple, so exporters see plain tensors and the peers compute everything eager does."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", False) else {}

    def forward(self, *inputs):
        return tuple(flat_outputs(self.model(*inputs, **self.kwargs)))


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter (registration warnings, constant-folding notes) during one export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ort(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], threads: int) -> Peer:
    import onnxruntime as ort

    wrapped = _AllOutputs(model).eval()
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(wrapped, inputs, dynamo=True, verbose=False)
        proto = program.model_proto.SerializeToString()
    del program
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    del proto
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"the ONNX graph takes {len(names)} inputs, the model {len(inputs)}")
    feed = {name: x.numpy() for name, x in zip(names, inputs)}

    def run():
        return session.run(None, feed)
    return Peer("ort", run, lambda: [torch.from_numpy(o) for o in run()],
                f"torch.onnx.export(dynamo=True); onnxruntime {ort.__version__}, ORT_ENABLE_ALL, {threads} threads")


def ov_convert(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    """The OpenVINO model, and how it was converted: the module directly, else its torch.export program."""
    import openvino as ov

    wrapped = _AllOutputs(model).eval()
    try:
        with _quiet(), torch.no_grad():
            return ov.convert_model(wrapped, example_input=inputs), "convert_model(module)"
    except Exception as direct:  # any converter failure: try the other path, then report both
        reason = one_line(direct, limit=150)
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(wrapped, inputs)
            return ov.convert_model(program), f"convert_model(torch.export) (direct: {reason})"
    except Exception as exported:
        raise RuntimeError(f"direct: {reason}; via torch.export: {one_line(exported, limit=150)}") from exported


def ov_precision(compiled) -> str:
    """The precision an OpenVINO compiled model runs in, read from its properties and its runtime model."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and "runtimePrecision" in info:
            layers.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str)))
    return summarize_precisions(hint, layers)


def ov_compile(ov_model, name: str, threads: int):
    """OpenVINO's CPU compile of ``ov_model`` as the peer ``name`` runs it (``ov-f32``: the f32 precision hint)."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if name == "ov-f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return ov.Core().compile_model(ov_model, "CPU", config)


def _ov(ov_model, how: str, name: str, inputs: tuple[torch.Tensor, ...], threads: int) -> Peer:
    import openvino as ov

    compiled = ov_compile(ov_model, name, threads)
    if len(compiled.inputs) != len(inputs):
        raise RuntimeError(f"the OpenVINO model takes {len(compiled.inputs)} inputs, the model {len(inputs)}")
    request = compiled.create_infer_request()
    arrays = [x.numpy() for x in inputs]

    def run():
        return request.infer(arrays, share_inputs=True, share_outputs=True)

    def outputs():
        result = run()
        return [torch.from_numpy(result[o].copy()) for o in compiled.outputs]
    version = ov.__version__.split("-")[0]
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return Peer(name, run, outputs, f"{how}; openvino {version}, precision {ov_precision(compiled)}, {threads} threads",
                hint)


def build(names: Iterable[str], model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
          threads: int | None = None) -> tuple[dict[str, Peer], dict[str, str]]:
    """The peers ``names`` for one forward of ``model`` on ``inputs`` (each already run once), and a one-line
    reason for each that could not be built. Never raises for a peer's failure."""
    threads = threads or torch.get_num_threads()
    peers: dict[str, Peer] = {}
    failed: dict[str, str] = {}
    converted = None  # OpenVINO's converted model and how, shared by ov-f32 and ov; or why it failed
    for name in names:
        why = missing(name)
        if why:
            failed[name] = why
            continue
        try:
            if name == "ort":
                peer = _ort(model, inputs, threads)
            else:
                if converted is None:
                    try:
                        converted = ov_convert(model, inputs)
                    except Exception as exc:  # reported for both OpenVINO peers
                        converted = f"conversion failed: {one_line(exc, limit=400)}"
                if isinstance(converted, str):
                    failed[name] = converted
                    continue
                peer = _ov(*converted, name, inputs, threads)
            peer.outputs()  # a peer that cannot run is reported here, not in the middle of the timed rounds
            peers[name] = peer
        except Exception as exc:  # one peer's failure is reported; the run goes on
            failed[name] = one_line(exc)
    return peers, failed
