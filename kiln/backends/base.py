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
from ..ir.printer import op_name


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
    """One backend, configured for one compilation by its own options object.

    ``options_type`` is the dataclass of those options (None: the backend has
    none); a compilation gives it ``CompileOptions.backend_options[name]``, or
    ``options_type()`` (the defaults) when that has no entry for it.
    """

    name: ClassVar[str]
    options_type: ClassVar[type | None] = None
    # The queue nodes placed here run on unless a pass chose one (NodeMeta.queue); None: the default queue (cpu0).
    default_queue: ClassVar[str | None] = None

    def __init__(self, options=None):
        if options is None and self.options_type is not None:
            options = self.options_type()
        self.options = options

    @abstractmethod
    def supports(self, node: fx.Node) -> bool:
        """Whether this backend can run ``node`` (a ``call_function`` node)."""

    def refusal(self, node: fx.Node) -> str | None:
        """Why this backend cannot run ``node``, naming the op (None: it can). Placement records it.

        A backend with reasons to give (the ``npu`` backend's static shapes
        and op set) overrides this; the default derives it from ``supports``.
        """
        if self.supports(node):
            return None
        return f"{op_name(node.target)}: not supported by backend {self.name!r}"

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

    def modeled_task_us(self, partition: Partition) -> float | None:
        """A device model's time for ``partition`` of this compilation, whichever backend it was placed on.

        A target that models a device (``npu``: the NPU and the phone CPU
        beside it) prices every task of its programs, so a scheduler can order
        them (``ScheduleBlocks``); lowering records the first backend's answer
        in each task's report as ``modeled_us``. None: this backend models
        no device (the default).
        """
        return None

    def modeled_handoff_us(self) -> float | None:
        """The device model's cost of handing a value from one queue to another (None: no device model)."""
        return None


_BACKENDS: dict[str, type[Backend]] = {}

# target name -> backends it may place nodes on, most preferred first
TARGETS: dict[str, list[str]] = {
    "cpu": ["cpu", "torch"],  # TVM; PyTorch kernels for what TVM cannot lower
    "npu": ["npu", "cpu", "torch"],  # the emulated NPU's int8 matmuls; the CPU for what it refuses
    "torch": ["torch"],  # the reference: PyTorch's kernels only
}


def register_backend(cls: type[Backend]) -> type[Backend]:
    if cls.name in _BACKENDS and _BACKENDS[cls.name] is not cls:
        raise KilnError(f"a backend named {cls.name!r} is already registered")
    _BACKENDS[cls.name] = cls
    return cls


def _backend_class(name: str, kind: str = "backend") -> type[Backend]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UnknownNameError(kind, name, _BACKENDS, plural="backends") from None


def get_backend(name: str, options=None) -> Backend:
    """Backend ``name`` with its own ``options`` (an instance of its ``options_type``; None: the defaults)."""
    return _backend_class(name)(options)


def check_backend_options(backend_options) -> dict:
    """``CompileOptions.backend_options`` checked: backend names, each with an instance of its ``options_type``."""
    if not isinstance(backend_options, dict):
        raise KilnError("CompileOptions.backend_options must be a dict of backend name -> that backend's options "
                        f"(e.g. {{'cpu': CpuOptions(...)}}), not {type(backend_options).__name__}")
    for name, value in backend_options.items():
        cls = _backend_class(name, "backend name in CompileOptions.backend_options:")
        if cls.options_type is None:
            raise KilnError(f"CompileOptions.backend_options[{name!r}]: backend {name!r} takes no options")
        if not isinstance(value, cls.options_type):
            raise KilnError(f"CompileOptions.backend_options[{name!r}] must be a {cls.options_type.__module__}."
                            f"{cls.options_type.__name__}, not {type(value).__name__}")
    return dict(backend_options)


def target_backends(target: str, options=None) -> list[Backend]:
    """The backends of ``target``, each with its options from ``options`` (a ``CompileOptions``; None: defaults)."""
    try:
        names = TARGETS[target]
    except KeyError:
        raise UnknownNameError("target", target, TARGETS) from None
    backend_options = options.backend_options if options is not None else {}
    return [get_backend(n, backend_options.get(n)) for n in names]
