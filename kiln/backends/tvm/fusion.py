"""Fuse a residual add with the norm that reads it into one kernel (two outputs: sum and normalized).

Run on the converted Relax module, before legalization (the patterns match
Relax ops). TVM's ``FuseOps`` stops short here: it neither puts the residual
add (whose sum is also read by the next residual add) nor RMSNorm's square
into the reduction's kernel, so eager's memory passes stay. Each pattern
groups its ops into a private function marked ``Primitive`` that returns
every value used outside it; ``FuseTIR`` later turns each group into one
PrimFunc, which ``schedule.RowReduction`` schedules row by row.

Patterns are a (name, pattern) table so the report and tests can count them.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

COMPOSITE = "Composite"
FUSED = "kiln.fused"  # the pattern that made a group, for the report


def _either(op: str, a, b):
    """``op(a, b)`` or ``op(b, a)``: both orders appear in exported models."""
    return is_op(op)(a, b) | is_op(op)(b, a)


def _rms_norm(x):
    sq = is_op("relax.multiply")(x, x)
    inv = is_op("relax.rsqrt")(_either("relax.add", is_op("relax.mean")(sq), wildcard()))
    return _either("relax.multiply", _either("relax.multiply", x, inv), wildcard())


def _layer_norm(x):
    return is_op("relax.nn.layer_norm")(x, wildcard(), wildcard())


def _residual():
    return is_op("relax.add")(wildcard(), wildcard())


# Most specific first: FuseOpsByPattern tries them in order.
PATTERNS: list[tuple[str, object]] = [
    ("kiln.add_rms_norm", _rms_norm(_residual())),
    ("kiln.add_layer_norm", _layer_norm(_residual())),
    ("kiln.rms_norm", _rms_norm(wildcard())),
]


@tvm.transform.module_pass(opt_level=0, name="kiln.FuseResidualNorm")
def fuse_residual_norm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    mod = relax.transform.FuseOpsByPattern(PATTERNS, bind_constants=False)(mod)
    # The groups are for FuseTIR, not for an external codegen: without the
    # Composite mark, legalization lowers their bodies like any other function.
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and func.attrs is not None and COMPOSITE in func.attrs:
            mod[gv] = func.without_attr(COMPOSITE).with_attr(FUSED, str(func.attrs[COMPOSITE]))
    return mod
