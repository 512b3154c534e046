"""The LLVM target kiln compiles CPU partitions for: this host's CPU, as LLVM names it.

The CPU name comes from LLVM's host detection, not from /proc/cpuinfo: a VM
may hide instruction sets its CPU model has (this machine is a Zen 5 whose
hypervisor masks AVX-512, and LLVM reports ``znver3``), and code built for
the model name would die with an illegal instruction.
"""
from __future__ import annotations

import os

import tvm
from tvm.target import codegen


def host_cpu() -> str:
    return codegen.llvm_get_system_cpu()


def host_target(num_cores: int | None = None) -> dict:
    cores = num_cores or len(os.sched_getaffinity(0))
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores}


def tvm_version() -> str:
    return tvm.__version__
