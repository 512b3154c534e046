"""Int8 linears with their activation outliers computed in float beside them (mllm-NPU's shadow linears).

What it does, when ``CompileOptions.int8`` is an :class:`Int8Quantization`
(otherwise nothing): every ``aten.linear`` whose weight is a stored 2-D
floating-point graph weight (and whose bias, if any, is one too) becomes

    int8_linear(x, Wq, ws, bias, x_scale) + linear(index_select(x, -1, idx), W[:, idx])

- ``idx``: the *outlier channels* of the linear's input, chosen from the
  calibrated per-channel abs-max ``a`` (``ctx.activation_stats``): the
  channels with ``a > threshold`` (``threshold`` an option; by default
  ``ratio`` x the lower median of ``a``, so each layer's threshold follows its
  own calibrated range), the largest first, at most ``floor(max_fraction * K)``
  of the ``K`` channels; sorted ascending.
- ``x_scale``: one static per-tensor scale, ``max(a[j] for j not in idx) / 127``
  (rounded to float32): the int8 codes cover the non-outlier channels without
  clipping them on the calibration set; the outlier channels saturate there,
  and their weight columns are zero, so they add nothing to the int8 part.
- ``Wq, ws``: the weight with the outlier columns zeroed, symmetric int8 per
  output channel (``ws[n] = max_k |W[n, k]| / 127`` over the columns kept, 1
  for a row of zeros; codes rounded half to even).
- the float part: the outlier columns of the float weight times the outlier
  channels of ``x``, exactly, in the model's dtype; no bias (``int8_linear``
  adds it).

So the sum is int8 arithmetic on the clipped activations plus exact float
arithmetic on the outliers. Linears reading one input with the same outlier
channels (q, k and v) share one ``index_select``. A layer with no outlier
channel, or whose float path is dropped, is a plain ``int8_linear`` over
every channel (``x_scale`` = the calibrated abs-max of all channels / 127, no
clipping): plain w8a8.

Which layers keep a float path (``float_path``): ``"auto"`` (default) measures
each layer alone on the calibration set (its float input, its float output)
and keeps the float path only where it cuts the layer's relative output error
by at least ``min_gain`` x against plain int8 (mllm-NPU prunes the outliers
that matter little); ``"all"``; ``"none"`` (plain w8a8 everywhere); or the
names (module paths, e.g. ``encoder.layer.0.output.dense``, or node names) of
the layers that keep it.

The int8 node carries ``NodeMeta.quant`` (symmetric, 8 bits, per-channel,
``scale`` naming ``ws``). Placement decides where each part runs: the ``npu``
target runs ``int8_linear``; ``index_select``, the float linear and the add
stay on ``cpu``. On ``cpu`` everything runs there (``int8_linear`` on the
``torch`` backend).

Needs: calibration data (``CompileOptions.calibration``, else the real example
inputs: a few samples give poor scales), run on the float graph, so after the
cleanup passes and before placement; not together with ``quantize_nested``
(``CompileOptions`` refuses both). The stats (``PassResult.stats``, stored in
the manifest's pass records and shown by ``kiln inspect --int8``) give totals
(``int8`` linears, ``float_path`` layers, ``float_channels`` of ``channels``,
``float_fraction``) and, under ``layers`` by module path, per layer: the
float channels, ``x_scale``, the threshold, the measured errors and why the
float path was kept or dropped.

Error bound, against the float linear: the float part is exact up to fp32
rounding; the int8 part's error in output ``n`` is at most
``sum_k |x_k - x_scale q_k| |ws_n Wq[n, k]| + |x_k| |W[n, k] - ws_n Wq[n, k]|``
over the non-outlier channels ``k`` (int32 accumulation is exact), with
``|W[n, k] - ws_n Wq[n, k]| <= ws_n / 2`` and ``|x_k - x_scale q_k| <=
x_scale / 2`` inside the calibrated range (beyond it a code saturates: no
bound). The tests hold the ends exactly: bitwise plain int8 when no channel
is an outlier, the float linear within fp32 tolerance when every channel is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import KilnError
from ..ir import Graph, QuantSpec
from ..ir.ops import int8_linear
from ..ir.rewrite import insert_node, node_arg, replace_node
from .base import Pass, PassContext, PassResult, register_pass

INT8_LINEAR = torch.ops.kiln.int8_linear.default
LINEAR = torch.ops.aten.linear.default
INDEX_SELECT = torch.ops.aten.index_select.default
FLOAT_PATH_MODES = ("auto", "all", "none")


@dataclass(frozen=True)
class Int8Quantization:
    """What ``extract_outliers`` does: w8a8 linears, their input's outlier channels in float.

    ``threshold``: a channel is an outlier when its calibrated abs-max exceeds
    this (``inf``: none is, plain int8; 0: every non-zero channel is, within
    ``max_fraction``); None (default): ``ratio`` x the lower median of that
    layer's channel abs-maxes. ``max_fraction``: at most this fraction of a
    layer's input channels go to float (the largest). ``float_path``:
    ``"auto"`` | ``"all"`` | ``"none"`` | names of the layers that keep one
    (module paths or node names); ``"auto"`` keeps it where it cuts the
    layer's measured output error by at least ``min_gain`` x. ``exclude``:
    names of linears left float entirely (not quantized).
    """

    threshold: float | None = None
    ratio: float = 6.0
    max_fraction: float = 0.01
    float_path: str | tuple[str, ...] = "auto"
    min_gain: float = 1.5
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        where = "Int8Quantization"
        if self.threshold is not None:
            if not _is_number(self.threshold) or math.isnan(self.threshold) or self.threshold < 0:
                raise KilnError(f"{where}.threshold must be a number >= 0 (inf: no outliers) or None (derived "
                                f"from calibration), not {self.threshold!r}")
            object.__setattr__(self, "threshold", float(self.threshold))
        if not _is_number(self.ratio) or math.isnan(self.ratio) or self.ratio <= 0:
            raise KilnError(f"{where}.ratio must be a number > 0 (a multiple of the median channel abs-max), "
                            f"not {self.ratio!r}")
        if not _is_number(self.max_fraction) or not 0 <= self.max_fraction <= 1:
            raise KilnError(f"{where}.max_fraction must be a fraction in [0, 1], not {self.max_fraction!r}")
        if not _is_number(self.min_gain) or not 1 <= self.min_gain < math.inf:
            raise KilnError(f"{where}.min_gain must be a finite number >= 1 (the error reduction a float path "
                            f"must bring), not {self.min_gain!r}")
        object.__setattr__(self, "float_path", _names_or_mode(self.float_path, f"{where}.float_path"))
        object.__setattr__(self, "exclude", _names(self.exclude, f"{where}.exclude"))
        object.__setattr__(self, "ratio", float(self.ratio))
        object.__setattr__(self, "max_fraction", float(self.max_fraction))
        object.__setattr__(self, "min_gain", float(self.min_gain))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _names(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list, set, frozenset)) \
            or not all(isinstance(v, str) and v for v in value):
        raise KilnError(f"{where} must be a tuple of layer names (module paths or node names), not {value!r}")
    return tuple(value)


def _names_or_mode(value, where: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if value not in FLOAT_PATH_MODES:
            raise KilnError(f"{where} must be one of {', '.join(map(repr, FLOAT_PATH_MODES))} or a tuple of "
                            f"layer names, not {value!r}")
        return value
    return _names(value, where)


@dataclass
class _Choice:
    """One linear's outlier channels and activation scale."""

    idx: list[int]
    x_scale: float
    threshold: float


def module_path(graph: Graph, node: fx.Node) -> str:
    """The linear's module path (its weight's name in the model, less ``.weight``), else its node name."""
    source = graph.weight_sources.get(node.args[1].name)
    return source.removesuffix(".weight") if source else node.name


def candidates(graph: Graph) -> tuple[list[fx.Node], list[str]]:
    """The linears this pass can rewrite, and those it leaves float (with why)."""
    chosen, left = [], []
    for node in graph.compute_nodes():
        if node.target is not LINEAR:
            continue
        weight = node.args[1]
        bias = node_arg(node, 2, "bias")
        if not (isinstance(weight, fx.Node) and graph.is_weight(weight)) or (
                bias is not None and not (isinstance(bias, fx.Node) and graph.is_weight(bias))):
            left.append(f"{node.name} (its weight or bias is computed, not a stored weight)")
        elif graph.weights[weight.name].dim() != 2 or not graph.weights[weight.name].is_floating_point():
            left.append(f"{node.name} (weight {weight.name} is not a 2-D floating-point tensor)")
        else:
            chosen.append(node)
    return chosen, left


def choose_outliers(channel_absmax: torch.Tensor, threshold: float, max_fraction: float) -> _Choice:
    """The outlier channels (abs-max > ``threshold``, the largest first, at most ``max_fraction`` of them)
    and the int8 scale of the others."""
    a = channel_absmax.double()
    over = torch.nonzero(a > threshold).flatten()
    cap = math.floor(max_fraction * a.numel() + 1e-9)
    if over.numel() > cap:
        # the largest abs-maxes; ties broken by the lower channel index (a stable sort)
        order = torch.sort(a[over], descending=True, stable=True).indices
        over = over[order[:cap]]
    idx = sorted(over.tolist())
    keep = torch.ones(a.numel(), dtype=torch.bool)
    keep[idx] = False
    return _Choice(idx, _scale(a[keep].max().item() if keep.any() else 0.0), threshold)


def _scale(absmax: float) -> float:
    """``absmax / 127`` as a float32 value (1 when ``absmax`` is 0: every code is 0 then)."""
    if not absmax > 0:
        return 1.0
    return torch.tensor(absmax / 127, dtype=torch.float32).item()


def quantize_weight(weight: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [N, K] with the columns ``idx`` zeroed as symmetric int8 per output channel: (codes, scales)."""
    w = weight.detach().float().clone()
    w[:, idx] = 0
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(torch.float32)
    codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return codes, scale


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, idx: list[int],
                     x_scale: float) -> torch.Tensor:
    """What a rewritten linear computes, in one function (for measuring and for tests)."""
    codes, scale = quantize_weight(weight, idx)
    out = int8_linear(x, codes, scale, bias, x_scale)
    if idx:
        index = torch.tensor(idx, dtype=torch.int64)
        out = out + torch.nn.functional.linear(x.index_select(-1, index), weight.index_select(1, index))
    return out


@register_pass
class ExtractOutliers(Pass):
    name = "extract_outliers"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        config = getattr(ctx.options, "int8", None)
        if config is None:
            return PassResult(False, {"int8": 0})
        nodes, left = candidates(graph)
        names = {n: {module_path(graph, n), n.name} for n in nodes}
        known = sorted(module_path(graph, n) for n in nodes)
        for field_name, wanted in (("exclude", config.exclude),
                                   ("float_path", () if isinstance(config.float_path, str) else config.float_path)):
            unknown = sorted(set(wanted) - set().union(*names.values()))
            if unknown:
                raise KilnError(f"Int8Quantization.{field_name} names layers {unknown} that are not linears this pass "
                                f"can quantize; the linears: {', '.join(known[:12])}"
                                + (f", ... ({len(known)} in all)" if len(known) > 12 else ""))
        excluded = [n for n in nodes if names[n] & set(config.exclude)]
        left += [f"{n.name} (excluded: {module_path(graph, n)})" for n in excluded]
        nodes = [n for n in nodes if n not in excluded]
        if not nodes:
            raise KilnError("extract_outliers: the model has no linear layer it can quantize"
                            + (f" ({'; '.join(left[:5])})" if left else ""))
        stats = ctx.activation_stats(graph, histograms=False)
        choices, plain = {}, {}
        for n in nodes:
            a = stats[n.args[0]].channel_absmax
            k = graph.weights[n.args[1].name].shape[1]
            if a.numel() != k:
                raise KilnError(f"extract_outliers: {n.name}'s input has {a.numel()} channels in calibration, its "
                                f"weight {k} inputs")
            threshold = config.threshold if config.threshold is not None else config.ratio * a.double().median().item()
            choices[n] = choose_outliers(a, threshold, config.max_fraction)
            plain[n] = _Choice([], _scale(a.max().item()), threshold)
        errors = {}
        if config.float_path == "auto" and any(c.idx for c in choices.values()):
            errors = _measure(graph, _samples(ctx), {n: (choices[n], plain[n]) for n in nodes if choices[n].idx})
        layers, shared = {}, {}
        for n in nodes:
            choice, why = self._decide(graph, n, choices[n], plain[n], config, names[n], errors.get(n))
            entry = {"module": module_path(graph, n), "in_features": graph.weights[n.args[1].name].shape[1],
                     "out_features": graph.weights[n.args[1].name].shape[0],
                     "layer": graph.meta(n).layer, "role": graph.meta(n).role,
                     "threshold": choices[n].threshold, "candidates": len(choices[n].idx),
                     "float_channels": choice.idx, "x_scale": choice.x_scale, "float_path": why}
            if n in errors:
                entry["rel_error_plain"], entry["rel_error_outliers"] = errors[n]
            entry["node"] = self._rewrite(graph, n, choice, shared)
            key = entry["module"] if entry["module"] not in layers else entry["node"]
            layers[key] = entry
        channels = sum(e["in_features"] for e in layers.values())
        on_float = sum(len(e["float_channels"]) for e in layers.values())
        return PassResult(True, {
            "int8": len(layers), "float_path": sum(1 for e in layers.values() if e["float_channels"]),
            "float_channels": on_float, "channels": channels, "float_fraction": on_float / channels,
            "left_float": len(left), "layers": layers, **({"left_float_names": left} if left else {})})

    @staticmethod
    def _decide(graph: Graph, node: fx.Node, choice: _Choice, plain: _Choice, config: Int8Quantization,
                names: set[str], errors) -> tuple[_Choice, str]:
        """The choice this layer gets, and why (for the report)."""
        if not choice.idx:
            return plain, "no outliers"
        mode = config.float_path
        if mode == "none":
            return plain, "dropped (float_path='none')"
        if mode == "all":
            return choice, "kept (float_path='all')"
        if isinstance(mode, tuple):
            return (choice, "kept (named)") if names & set(mode) else (plain, "dropped (not named)")
        e_plain, e_out = errors
        gain = e_plain / e_out if e_out > 0 else math.inf
        if gain >= config.min_gain:
            return choice, f"kept (gain {gain:.3g}x >= {config.min_gain:g}x)"
        return plain, f"dropped (gain {gain:.3g}x < {config.min_gain:g}x)"

    @staticmethod
    def _rewrite(graph: Graph, node: fx.Node, choice: _Choice, shared: dict) -> str:
        """Rewrite one linear; ``shared`` maps (input, channels) to the index_select already made for them
        (q, k and v read one input: one gather of its outlier channels serves the three)."""
        x, weight_node = node.args[0], node.args[1]
        bias = node_arg(node, 2, "bias")
        weight = graph.weights[weight_node.name]
        codes, scale = quantize_weight(weight, choice.idx)
        base = weight_node.name
        source = graph.weight_sources.get(base)
        added = {}
        with graph.fx.inserting_before(node):
            added["int8"] = graph.add_weight(f"{base}_int8", codes, source and f"{source}:int8")
            added["scale"] = graph.add_weight(f"{base}_scale", scale, source and f"{source}:scale")
            if choice.idx:
                index = torch.tensor(choice.idx, dtype=torch.int64)
                added["float"] = graph.add_weight(f"{base}_outlier", weight.index_select(1, index).contiguous(),
                                                  source and f"{source}:outlier")
                key = (x, tuple(choice.idx))
                if key not in shared:
                    idx = graph.add_weight(f"{base}_outlier_idx", index, source and f"{source}:outlier_idx")
                    rank = len(x.meta["val"].shape)
                    shared[key] = insert_node(graph.fx, INDEX_SELECT, (x, rank - 1, idx), origin=node)
        spec = QuantSpec("symmetric", (8,), scale=added["scale"].name, axis=0, layout="per-channel")
        args = (x, added["int8"], added["scale"], bias, choice.x_scale)
        if not choice.idx:
            result = replace_node(graph.fx, node, INT8_LINEAR, args)
            graph.meta(result).quant = spec
        else:
            q = insert_node(graph.fx, INT8_LINEAR, args, origin=node)
            graph.meta(q).quant = spec
            shadow = insert_node(graph.fx, LINEAR, (shared[(x, tuple(choice.idx))], added["float"]), origin=node)
            result = replace_node(graph.fx, node, torch.ops.aten.add.Tensor, (q, shadow))
            result.meta["kiln_outliers"] = {"int8": q.name, "float": shadow.name}
        if not weight_node.users:
            graph.remove_weight(weight_node)
        return result.name


def _samples(ctx: PassContext) -> list[list[torch.Tensor]]:
    return ctx.calibration if ctx.calibration is not None else [ctx.real_inputs]


def _measure(graph: Graph, samples: list[list[torch.Tensor]],
             choices: dict[fx.Node, tuple[_Choice, _Choice]]) -> dict[fx.Node, tuple[float, float]]:
    """Per linear, alone on its float input: the relative output error of plain int8 and of int8 + outliers."""
    sums = {n: [0.0, 0.0, 0.0] for n in choices}  # squared error plain, squared error outliers, squared output

    class Probe(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in choices:
                x, weight = self.env[node.args[0]], graph.weights[node.args[1].name]
                bias = node_arg(node, 2, "bias")
                bias = None if bias is None else graph.weights[bias.name]
                want = out.double()
                s = sums[node]
                for i, choice in enumerate((choices[node][1], choices[node][0])):
                    got = reference_linear(x, weight, bias, choice.idx, choice.x_scale)
                    s[i] += (got.double() - want).pow(2).sum().item()
                s[2] += want.pow(2).sum().item()
            return out

    graph.gm.recompile()
    with torch.no_grad():
        for args in samples:
            Probe(graph.gm).run(*graph.placeholder_args(list(args)))
    return {n: (math.sqrt(s[0] / s[2]) if s[2] else 0.0, math.sqrt(s[1] / s[2]) if s[2] else 0.0)
            for n, s in sums.items()}

