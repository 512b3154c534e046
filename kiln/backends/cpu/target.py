"""The CPU as a TVM target: LLVM for this host's CPU, PyTorch kernels by library dispatch, kiln's CPU rules.

The CPU name comes from LLVM's host detection, not from /proc/cpuinfo: a VM
may hide instruction sets its CPU model has (this machine is a Zen 5 whose
hypervisor masks AVX-512, and LLVM reports ``znver3``), and code built for
the model name would die with an illegal instruction.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import ClassVar

import tvm
from tvm.target import codegen

from ..tvm.dispatch import LibraryDispatch
from ..tvm.target import PlanStage, TvmTarget
from .dispatch import DISPATCH
from . import attention, lowbit
from .gemm import select_gemm_kernels
from .schedule import default_rules
from .tuning import Tuning, tune_kernels


def host_cpu() -> str:
    return codegen.llvm_get_system_cpu()


def host_target(num_cores: int | None = None) -> dict:
    cores = num_cores or len(os.sched_getaffinity(0))
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores}


@dataclass
class CpuTarget(TvmTarget):
    """The ``cpu`` backend's target for one compilation.

    ``gemm_kernels``: how each dispatched GEMM's kernel is chosen (``gemm.MODES``;
    by default measured on this machine). ``tuning``: MetaSchedule trials and
    starting databases (None, or 0 trials and no database: no tune stage).
    ``target``: a TVM JSON target dict (None: this host, ``host_target()``). ``pack_weights``: whether
    f32 linears on the partition's weights may run on copies packed at load (``gemm.py``'s ``mkl_packed``).
    """

    name: ClassVar[str] = "cpu"
    dispatch: ClassVar[LibraryDispatch] = DISPATCH

    gemm_kernels: str = "measure"
    tuning: Tuning | None = None
    pack_weights: bool = True  # CpuOptions.pack_weights: f32 linears may run on weights packed at load
    target: dict | None = None

    def target_json(self) -> dict:
        return dict(self.target or host_target())

    def spec_fields(self, target: dict) -> dict:
        return {"mcpu": target.get("mcpu")}  # TvmVmKernel refuses a library built for another CPU

    def converters(self) -> dict:
        target = tvm.target.Target(self.target_json())  # the kernels' schedule follows the CPU compiled for
        return {lowbit.NESTED_LINEAR: functools.partial(lowbit.convert_nested_linear, target=target),
                attention.SDPA: attention.convert_attention}

    def plan_stages(self) -> list[PlanStage]:
        return [PlanStage("select_gemm", "gemm_kernels", lambda plan, weights: select_gemm_kernels(
            plan, self.gemm_kernels, constants=weights if self.pack_weights else frozenset()))]

    def schedule_rules(self) -> list:
        return default_rules()

    def tunes(self) -> bool:
        return self.tuning is not None and self.tuning.active()

    def tune(self, mod: tvm.IRModule, target: tvm.target.Target):
        return tune_kernels(mod, target, self.tuning)
