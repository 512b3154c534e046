"""The CPU compilation pipeline as named stages (the shape of TVM's ``relax/backend/*/pipeline.py``).

    library_dispatch   FX: which nodes run as PyTorch kernels (dispatch.plan_dispatch)
    select_gemm        FX: each dispatched GEMM's kernel (MKL, MKL in column blocks, oneDNN),
                       measured per shape on this machine (gemm.select_gemm_kernels)
    convert            FX -> Relax, dispatched nodes as R.call_dps_packed (convert.to_relax)
    fuse_norm          residual add + RMS/layer norm grouped into one kernel (fusion.py)
    legalize           Relax ops -> TIR PrimFuncs; constants folded
    fuse               chains of TIR ops -> one kernel each (residual add + norm,
                       bias/scale + activation, RoPE's mul/neg/cat/add)
    schedule           every kernel gets a CPU schedule (schedule.default_rules)
    dataflow_lower     Relax dataflow -> VM calls
    finalize           memory planning (buffers reused across kernels), VM lowering

The Relax stages are lists of passes per name, so a test or ``kiln inspect``
can run up to any stage and look at the module.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ...errors import UnknownNameError
from .fusion import fuse_residual_norm
from .schedule import schedule_pass


def fuse_norm_passes() -> list:
    return [fuse_residual_norm]


def legalize_passes() -> list:
    return [
        relax.transform.DeadCodeElimination(),
        # Scans and sorts (cumsum) have no LegalizeOps rule on CPU; TVM routes them here.
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
    ]


def fuse_passes() -> list:
    return [relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]


def schedule_passes() -> list:
    return [schedule_pass()]


def dataflow_lower_passes() -> list:
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]


def finalize_passes() -> list:
    return [
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


# The Relax-level stages, in order (library_dispatch, select_gemm and convert run on FX before them).
RELAX_STAGES = {
    "fuse_norm": fuse_norm_passes,
    "legalize": legalize_passes,
    "fuse": fuse_passes,
    "schedule": schedule_passes,
    "dataflow_lower": dataflow_lower_passes,
    "finalize": finalize_passes,
}


def stage(name: str) -> tvm.transform.Pass:
    if name not in RELAX_STAGES:
        raise UnknownNameError("pipeline stage", name, RELAX_STAGES)
    return tvm.transform.Sequential(RELAX_STAGES[name](), name=f"kiln.cpu.{name}")
