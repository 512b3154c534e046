"""Activation statistics for passes: run the current graph on real inputs and summarise every value.

A pass that needs activation ranges (quantization scales, outlier channels)
calls ``ctx.activation_stats(graph)``. That runs the graph as it is at that
moment (its ``GraphModule`` with its weights, PyTorch kernels, node by node)
on the calibration set, ``CompileOptions.calibration`` (an iterable of input
tuples, called like the example inputs), or on the real example inputs when
no set was given, and returns an :class:`ActivationStats`: per node with a
floating-point tensor value (user inputs and ``call_function`` nodes; a
node returning several tensors is covered by its ``getitem`` users), over
all samples,

- ``min`` / ``max`` / ``absmax`` of every element;
- ``channel_absmax``: the abs-max per channel of the last axis (a ``[C]``
  tensor; a 0-d value is one channel);
- ``histogram``: counts in ``bins`` equal bins over ``[-absmax, absmax]``
  (``torch.histc``; a value equal to ``absmax`` falls in the last bin; when
  ``absmax`` is 0 every element is counted in the middle bin).

The histogram needs the final ``absmax`` first, so it costs a second sweep
over the samples; ask for ``histograms=False`` to skip it. Values are
summarised in float32 (float64 values in float64). The result is computed
when a pass first asks and cached in the pass context; it is computed again
only when the graph's nodes or weights changed since, so passes that never
ask cost nothing. A progress bar (rich) is shown when stderr is a terminal,
or when asked with ``progress=True``.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import InputMismatchError, KilnError
from ..ir import Graph, Signature

DEFAULT_BINS = 256


@dataclass
class TensorStats:
    """Statistics of one node's value over every calibration sample."""

    node: str
    shape: tuple[int, ...]  # of one sample's value
    dtype: torch.dtype
    count: int  # elements seen, over all samples
    min: float
    max: float
    absmax: float
    channel_absmax: torch.Tensor  # [channels of the last axis]
    histogram: torch.Tensor | None = None  # [bins] counts over [-absmax, absmax]; None if not asked for

    def bin_edges(self) -> torch.Tensor:
        """The ``bins + 1`` edges of :attr:`histogram`."""
        if self.histogram is None:
            raise KilnError(f"no histogram was collected for {self.node} (asked with histograms=False)")
        return torch.linspace(-self.absmax, self.absmax, len(self.histogram) + 1, dtype=torch.float64)


class ActivationStats(Mapping[str, TensorStats]):
    """:class:`TensorStats` by node name, over ``samples`` calibration samples."""

    def __init__(self, stats: dict[str, TensorStats], samples: int, bins: int | None):
        self._stats = stats
        self.samples = samples
        self.bins = bins  # None: no histograms

    def __getitem__(self, key: str | fx.Node) -> TensorStats:
        name = key.name if isinstance(key, fx.Node) else key
        try:
            return self._stats[name]
        except KeyError:
            raise KeyError(f"no activation statistics for {name!r} (not a floating-point tensor value, "
                           "or not a node of the graph the statistics were collected on)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)


def check_calibration(items, what: str = "CompileOptions.calibration") -> list[tuple]:
    """The calibration set as a list of argument tuples; raises naming the first bad item."""
    if isinstance(items, torch.Tensor) or isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise KilnError(f"{what} must be an iterable of input tuples (each called like the example inputs, "
                        f"e.g. [(x1,), (x2,)]), not {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            item = (item,)
        if not isinstance(item, (tuple, list)):
            raise KilnError(f"{what}[{i}] must be a tuple of inputs (like the example inputs), "
                            f"not {type(item).__name__}")
        out.append(tuple(item))
    if not out:
        raise KilnError(f"{what} is empty: give at least one input tuple, or leave it unset")
    return out


def flatten_calibration(items: list[tuple], signature: Signature,
                        what: str = "CompileOptions.calibration") -> list[list[torch.Tensor]]:
    """Each item as the graph's flat user inputs, checked against its signature (the error names the item)."""
    flat = []
    for i, args in enumerate(items):
        try:
            flat.append(signature.flatten(args, {}))
        except InputMismatchError as e:
            raise InputMismatchError(f"{what}[{i}]: {e}") from None
    return flat


def collect_stats(graph: Graph, samples: list[list[torch.Tensor]], *, histograms: bool = True,
                  bins: int = DEFAULT_BINS, progress: bool | None = None) -> ActivationStats:
    """Run ``graph`` on each sample (flat user inputs) and summarise every floating-point value."""
    if not samples:
        raise KilnError("activation statistics need at least one sample")
    if histograms and (isinstance(bins, bool) or not isinstance(bins, int) or bins < 1):
        raise KilnError(f"bins must be a positive int, not {bins!r}")
    user = {n.name for n in graph.input_nodes()}
    acc: dict[str, dict] = {}
    sweeps = 2 if histograms else 1
    with _progress(progress, len(samples) * sweeps, graph.name) as advance:
        for args in samples:
            _run(graph, args, user, lambda node, x: _first_sweep(acc, node, x))
            advance()
        if histograms:
            hist = {name: torch.zeros(bins, dtype=torch.int64) for name in acc}
            for args in samples:
                _run(graph, args, user, lambda node, x: _second_sweep(hist, acc, node, x, bins))
                advance()
    stats = {}
    for name, a in acc.items():
        stats[name] = TensorStats(
            node=name, shape=a["shape"], dtype=a["dtype"], count=a["count"], min=a["min"], max=a["max"],
            absmax=a["absmax"], channel_absmax=a["channel"], histogram=hist[name] if histograms else None)
    return ActivationStats(stats, len(samples), bins if histograms else None)


def _summarised(x) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return None
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _first_sweep(acc: dict, node: fx.Node, x: torch.Tensor) -> None:
    v = _summarised(x)
    if v is None:
        return
    channel = v.abs().reshape(-1, v.shape[-1] if v.dim() else 1).amax(0)
    a = acc.get(node.name)
    if a is None:
        acc[node.name] = {"shape": tuple(x.shape), "dtype": x.dtype, "count": v.numel(), "min": v.min().item(),
                          "max": v.max().item(), "channel": channel}
    else:
        a["count"] += v.numel()
        a["min"], a["max"] = min(a["min"], v.min().item()), max(a["max"], v.max().item())
        a["channel"] = torch.maximum(a["channel"], channel)
    a = acc[node.name]
    a["absmax"] = max(abs(a["min"]), abs(a["max"]))


def _second_sweep(hist: dict, acc: dict, node: fx.Node, x: torch.Tensor, bins: int) -> None:
    v = _summarised(x)
    if v is None or node.name not in hist:
        return
    bound = acc[node.name]["absmax"]
    if bound == 0:
        hist[node.name][bins // 2] += v.numel()
    else:
        hist[node.name] += torch.histc(v, bins, -bound, bound).to(torch.int64)


def _run(graph: Graph, args: list[torch.Tensor], user: set[str], record) -> None:
    """Run ``graph`` node by node on flat user inputs, calling ``record(node, value)`` on every value."""
    with torch.no_grad():
        _Recorder(graph.gm, user, record).run(*graph.placeholder_args(list(args)))


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, user: set[str], record):
        super().__init__(gm)
        self.user, self.record = user, record

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node.op == "call_function" or (node.op == "placeholder" and node.name in self.user):
            self.record(node, out)
        return out


class _progress:
    """A rich progress bar over the sweeps, shown on a terminal (or when asked); else nothing."""

    def __init__(self, show: bool | None, total: int, name: str):
        self.show = sys.stderr.isatty() if show is None else show
        self.total, self.name = total, name
        self.bar = None

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(f"calibrating {self.name}", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def stats_for(ctx, graph: Graph, *, histograms: bool = True, bins: int = DEFAULT_BINS,
              progress: bool | None = None) -> ActivationStats:
    """The statistics of ``graph`` as it is now on the context's calibration samples, cached in ``ctx``."""
    samples = ctx.calibration if ctx.calibration is not None else ([ctx.real_inputs] if ctx.real_inputs else [])
    if not samples:
        raise KilnError("no calibration data: the pass context has neither a calibration set "
                        "(CompileOptions.calibration) nor real example inputs")
    key = (id(graph), _fingerprint(graph))
    cached = ctx._activation_stats
    if cached is not None and cached[0] == key and (not histograms or cached[1].bins == bins):
        return cached[1]
    stats = collect_stats(graph, samples, histograms=histograms, bins=bins, progress=progress)
    ctx._activation_stats = (key, stats)
    return stats


def _fingerprint(graph: Graph) -> tuple:
    """Changes whenever a node, its op or inputs, or a weight tensor changes."""
    nodes = tuple((n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.fx.nodes)
    weights = tuple((k, id(v), v._version) for k, v in graph.weights.items())
    return nodes, weights
