"""The backend interface and registry.

A backend answers two separate questions (ExecuTorch's partitioner/preprocess
split): *can it run this node* (``supports``, used when placing nodes) and
*turn one partition into something the runtime can load* (``lower``, which
never edits its input). Targets name the backends they may use, in order of
preference.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from ..errors import KilnError, UnknownNameError


@dataclass
class Partition:
    """A connected run of nodes placed on one backend.

    ``gm``'s placeholders are the activations it reads (``inputs``, in order)
    followed by the weights it reads (``weight_names``); it returns the tuple of
    values other partitions or the model's output need (``outputs``).
    """

    name: str
    backend: str
    gm: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    weight_names: list[str]
    weights: dict[str, torch.Tensor]
    queue: str | None = None  # the queue its nodes were put on (NodeMeta.queue); None: the default queue


@dataclass
class LoweredPartition:
    """What a backend made of a partition: a runtime kernel format, its JSON spec and files."""

    format: str  # the runtime kernel format that loads it, e.g. "torch-graph"
    spec: dict  # JSON-serialisable, stored in the manifest
    files: dict[str, bytes] = field(default_factory=dict)  # extra files (libraries), by file name
    # Names in ``files`` the runtime never reads, kept for the compiler (a tuning database):
    # listed apart in the manifest so a kernel loader sees only its own files.
    compiler_files: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)  # what it did, stored in the manifest, for `kiln inspect`
    details: dict = field(default_factory=dict)  # in memory only: bulky debugging views (e.g. TIR text)


class Backend(ABC):
    """One backend, configured for one compilation by its ``CompileOptions`` (None: defaults)."""

    name: ClassVar[str]

    def __init__(self, options=None):
        self.options = options

    @abstractmethod
    def supports(self, node: fx.Node) -> bool:
        """Whether this backend can run ``node`` (a ``call_function`` node)."""

    @abstractmethod
    def lower(self, partition: Partition) -> LoweredPartition:
        """Turn a partition into a loadable kernel; must not mutate ``partition``."""

    def cost(self, node: fx.Node) -> float | None:
        """What running ``node`` (which it supports) here costs, lower is better; None: this backend has no cost model.

        Placement puts a node on the cheapest backend that prices it, and on
        the first that supports it where none does (first-fit). The unit is
        the target's to choose (estimated microseconds, say), shared by its backends.
        """
        return None


_BACKENDS: dict[str, type[Backend]] = {}

# target name -> backends it may place nodes on, most preferred first
TARGETS: dict[str, list[str]] = {
    "cpu": ["cpu", "torch"],  # TVM; PyTorch kernels for what TVM cannot lower
    "torch": ["torch"],  # the reference: PyTorch's kernels only
}


def register_backend(cls: type[Backend]) -> type[Backend]:
    if cls.name in _BACKENDS and _BACKENDS[cls.name] is not cls:
        raise KilnError(f"a backend named {cls.name!r} is already registered")
    _BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str, options=None) -> Backend:
    try:
        cls = _BACKENDS[name]
    except KeyError:
        raise UnknownNameError("backend", name, _BACKENDS) from None
    return cls(options)


def target_backends(target: str, options=None) -> list[Backend]:
    try:
        names = TARGETS[target]
    except KeyError:
        raise UnknownNameError("target", target, TARGETS) from None
    return [get_backend(n, options) for n in names]
