"""The compilation pipeline shared by kiln's TVM targets, as named stages (the shape of TVM's
``relax/backend/*/pipeline.py``), with the stages a target contributes marked ``[target]``:

    library_dispatch   FX: which nodes run as library kernels ([target] ``TvmTarget.dispatch``)
    <plan stages>      FX: [target] refinements of the plan, e.g. the CPU's ``select_gemm``
                       (each GEMM's kernel measured per shape: ``cpu/gemm.py``)
    convert            FX -> Relax, dispatched nodes as R.call_dps_packed (convert.to_relax)
    fuse_norm          residual add + RMS/layer norm grouped into one kernel (fusion.py)
    legalize           Relax ops -> TIR PrimFuncs; constants folded ([target] ``legalize_passes``;
                       the default is ``legalize_passes`` here)
    fuse               chains of TIR ops -> one kernel each (residual add + norm,
                       bias/scale + activation, RoPE's mul/neg/cat/add)
    tune               optional: [target] ``TvmTarget.tune`` (the CPU's MetaSchedule tuning)
    schedule           every kernel gets a schedule ([target] ``schedule_rules``, schedule.py)
    dataflow_lower     Relax dataflow -> VM calls
    finalize           memory planning (buffers reused across kernels), VM lowering

The Relax stages are lists of passes per name, so a test or ``kiln inspect``
can run up to any stage and look at the module: ``stage(name, target)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import tvm
from tvm import relax, topi

from ...errors import UnknownNameError
from .fusion import fuse_residual_norm
from .schedule import schedule_pass

if TYPE_CHECKING:
    from .target import TvmTarget


def fuse_norm_passes(_target: TvmTarget) -> list:
    return [fuse_residual_norm]


def _layer_norm_two_pass(x, gamma, beta, axis, epsilon):
    """Layer norm in two passes, as PyTorch: the mean first, then the mean square of ``x - mean``.

    TOPI's ``layer_norm`` takes the variance in one pass as E[x^2] - E[x]^2, which
    cancels catastrophically when a row's mean is large against its spread: a
    constant row normalized to 0.118 instead of 0 (eps 1e-12, fuzz seed 7001395).
    """
    ndim = len(x.shape)
    axes = [a % ndim for a in axis]
    count = 1
    for a in axes:
        count *= int(x.shape[a])
    # Shifted by the row's first element: a constant row is then exactly 0 (sum(x) / n alone is
    # off by rounding, which eps = 1e-5 amplifies to 2e-5 of a constant row's output; seed 8001135).
    def first(*i):
        return x(*(0 if d in axes else v for d, v in enumerate(i)))
    # (Not for one-element rows: TVM's simplifier folds x[0] - x[0] to 0, and inf or NaN came out 0.)
    shifted = tvm.te.compute(x.shape, lambda *i: x(*i) - first(*i), name="shifted") if count > 1 else x
    # The mean's sum accumulates in float64 for float32 rows: summed in float32 it carried an error of
    # 4e-8 per element against eager's Welford mean (1e-9), which a later 1 / x or a sum over the
    # normalized row amplified (fuzz seeds 9100138, 9701127).
    wide = "float64" if x.dtype == "float32" else x.dtype
    total = topi.sum(topi.cast(shifted, wide), axis=axes, keepdims=True)
    mean = topi.cast(topi.divide(total, tvm.tirx.const(count, wide)), x.dtype)
    centered = topi.subtract(shifted, mean)
    var = topi.divide(topi.sum(topi.multiply(centered, centered), axis=axes, keepdims=True),
                      tvm.tirx.const(count, x.dtype))
    normed = topi.multiply(centered, topi.rsqrt(topi.add(var, tvm.tirx.const(epsilon, x.dtype))))
    return topi.add(topi.multiply(normed, gamma), beta)


def _legalize_layer_norm(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(_layer_norm_two_pass, call.args[0], call.args[1], call.args[2],
                      axis=[int(a) for a in call.attrs.axes], epsilon=float(call.attrs.epsilon),
                      primfunc_name_hint="layer_norm")


def legalize_passes() -> list:
    """The default legalization: TVM's rules, with PyTorch's two-pass layer norm."""
    return [
        relax.transform.DeadCodeElimination(),
        # Scans and sorts (cumsum) have no LegalizeOps rule; TVM routes them per target here.
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.layer_norm": _legalize_layer_norm}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
    ]


def fuse_passes(_target: TvmTarget) -> list:
    return [relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]


def schedule_passes(target: TvmTarget) -> list:
    return [schedule_pass(target.schedule_rules())]


def dataflow_lower_passes(_target: TvmTarget) -> list:
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]


def finalize_passes(_target: TvmTarget) -> list:
    return [
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


# The Relax-level stages, in order (library_dispatch, the target's plan stages and convert run on
# FX before them; the optional tune stage between fuse and schedule): name -> passes for a target.
RELAX_STAGES = {
    "fuse_norm": fuse_norm_passes,
    "legalize": lambda target: target.legalize_passes(),
    "fuse": fuse_passes,
    "schedule": schedule_passes,
    "dataflow_lower": dataflow_lower_passes,
    "finalize": finalize_passes,
}


def stage(name: str, target: TvmTarget) -> tvm.transform.Pass:
    """The passes of stage ``name`` for ``target``, as one pass named ``kiln.<target>.<name>``."""
    if name not in RELAX_STAGES:
        raise UnknownNameError("pipeline stage", name, RELAX_STAGES)
    return tvm.transform.Sequential(RELAX_STAGES[name](target), name=f"kiln.{target.name}.{name}")
