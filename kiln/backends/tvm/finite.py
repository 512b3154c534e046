"""A bf16 tensor's "is anything here NaN or +-inf" flag, as a generated TVM kernel.

A library call that must not see a non-finite input (oneDNN's bf16 inner product spreads a NaN of input
row r+1 into output row r: tests/fuzz FINDINGS F2) used to find out with a PyTorch sum of the input inside
its Python function: 6-15 us alone, ~22 us inside a model (the input was just written by a TVM kernel on
another thread's core), a third of the call's own overhead. Here the converter emits, before such a call,
this kernel over the input seen flat (a view: no copy), and passes its ``int32[1]`` result to the function
(``DispatchRule.finite_flag``): 1 when some element's exponent bits are all ones (NaN of either sign, +-inf),
else 0. One thread, 32 bf16 lanes a step as int16 bit patterns (exact: no float compare, no sum that could
overflow): 0.9 us for MiniLM's 128x384 input, 2.8 us for 128x1536, measured here.
"""
from __future__ import annotations

import functools
import math

import tvm
from tvm import relax
from tvm.script import tirx as T

_L = 32  # bf16 lanes of a 512-bit vector
_OPAQUE = 8
_EXPONENT = 0x7F80  # bf16's exponent bits: all ones is NaN or +-inf


@functools.lru_cache(maxsize=64)
def nonfinite_flag_func(n: int) -> tvm.tirx.PrimFunc:
    """``flag[0] = 1`` if any of the ``n`` bf16 values of ``x`` is NaN or +-inf, else 0."""
    vectors = n // _L

    # The root block: Relax's build analyses every one-input ``call_tir`` callee as a block-structured kernel
    # (RewriteDataflowReshape), and TIR's own verifier does not know blocks, hence check_well_formed=False.
    @T.prim_func(private=True, check_well_formed=False)
    def f(x: T.Buffer((n,), "bfloat16"), flag: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            acc = T.alloc_buffer((_L,), "int16", scope="local")  # per lane, the largest exponent field seen
            top = T.alloc_buffer((1,), "int16", scope="local")
            acc[T.ramp(0, 1, _L)] = T.broadcast(T.int16(0), _L)
            for i in range(vectors):
                acc[T.ramp(0, 1, _L)] = T.max(acc[T.ramp(0, 1, _L)], T.bitwise_and(
                    T.reinterpret(f"int16x{_L}", x[T.ramp(i * _L, 1, _L)]), T.broadcast(T.int16(_EXPONENT), _L)))
            top[0] = T.int16(0)
            for j in range(_L):
                top[0] = T.max(top[0], acc[j])
            for i in range(vectors * _L, n):
                top[0] = T.max(top[0], T.bitwise_and(T.reinterpret("int16", x[i]), T.int16(_EXPONENT)))
            flag[0] = T.Select(top[0] == T.int16(_EXPONENT), 1, 0)

    return f


def emit_nonfinite_flag(bb: relax.BlockBuilder, value: relax.Expr, shape) -> relax.Var:
    """Emit the flag of the bf16 ``value`` (static ``shape``) into ``bb``: an ``int32[1]`` Relax value."""
    n = math.prod(int(d) for d in shape)
    name = f"kiln_bf16_nonfinite_n{n}"
    func = nonfinite_flag_func(n).with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    gv = bb.add_func(func.with_attr("op_pattern", _OPAQUE), name)  # kOpaque: fused with nothing
    flat = bb.emit(relax.op.reshape(value, [n]))
    return bb.emit(relax.call_tir(gv, [flat], relax.TensorType([1], "int32")))
