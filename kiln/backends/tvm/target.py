"""The seam between kiln's shared TVM lowering and one TVM target (``cpu`` now; ``cuda`` would slot in beside it).

``lowering.lower_partition`` runs the pipeline of ``pipeline.py`` and asks a
:class:`TvmTarget` for every part that depends on the hardware:

    target_json()      the TVM JSON target to compile for (the CPU's: LLVM, this host's mcpu, its cores)
    spec_fields(t)     what the runtime loader checks besides the TVM version (the CPU's: mcpu)
    dispatch           which FX nodes run as library kernels, and their ABI (``dispatch.LibraryDispatch``)
    plan_stages()      FX stages that refine the dispatch plan (the CPU's GEMM kernel selection)
    converters()       the target's own converters for ops the op table lacks (the CPU's kiln::nested_linear)
    legalize_passes()  Relax ops -> TIR (default: ``pipeline.legalize_passes``)
    schedule_rules()   the dlight-style rules that schedule each TIR kernel
    tunes(), tune()    optional tuning between fuse and schedule (the CPU's MetaSchedule tuning)

A target instance carries its configuration for one compilation (the CPU's
GEMM kernel mode and tuning). The CPU target is
``kiln.backends.cpu.target.CpuTarget``; nothing here imports it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import tvm

from .dispatch import LibraryDispatch, Plan


@dataclass(frozen=True)
class PlanStage:
    """A target's FX stage after ``library_dispatch``: rewrites the plan and reports what it chose."""

    name: str  # the stage, in the report's stage_seconds
    report_key: str  # where its report goes in the lowering report
    # (plan, the partition's weight nodes) -> (new plan, JSON-serialisable report)
    run: Callable[[Plan, frozenset], tuple[Plan, Any]]


class TvmTarget(ABC):
    """What one TVM target contributes to the shared pipeline (see the module docstring)."""

    name: ClassVar[str]  # names the pipeline's passes (``kiln.<name>.<stage>``) and messages
    dispatch: LibraryDispatch

    @abstractmethod
    def target_json(self) -> dict:
        """The TVM JSON target dict to compile for."""

    @abstractmethod
    def schedule_rules(self) -> list:
        """Schedule rules (``dlight.ScheduleRule``, wrapped in ``schedule.NamedRule``), tried in order."""

    def spec_fields(self, target: dict) -> dict:
        """Fields for the kernel spec that the runtime checks on load, next to ``target`` itself."""
        return {}

    def plan_stages(self) -> list[PlanStage]:
        return []

    def converters(self) -> dict:
        """The target's own converters, ``{op: fn(bb, node, value_of) -> Relax value}``, tried before the op
        table (``bb``: the converter's ``relax.BlockBuilder``; ``value_of(fx_node)``: an argument's Relax value).
        The CPU's: ``kiln::nested_linear`` as ``R.call_tir`` of its generated low-bit kernels."""
        return {}

    def legalize_passes(self) -> list:
        from .pipeline import legalize_passes  # pipeline.py names TvmTarget only for typing
        return legalize_passes()

    def tunes(self) -> bool:
        """Whether this compilation has a tune stage (``tune``)."""
        return False

    def tune(self, mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, Any]:
        """``(mod, result)``: the module with tuned kernels scheduled (``tirx.is_scheduled``), and a
        result with ``applied`` (the kernels scheduled from its records) and ``report()``."""
        raise NotImplementedError(f"the TVM target {self.name!r} does not tune")


def tvm_version() -> str:
    return tvm.__version__
