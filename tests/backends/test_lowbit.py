"""kiln.backends.cpu.lowbit: the generated low-bit kernels against a plain-torch dequantize-then-matmul.

The reference unpacks the planes with its own code, written from the layout's spec (not from the
kernels' nor kiln.ir.nested's), dequantizes in fp32 and multiplies in fp64. Tolerances:

- fp32 x: ``|y - ref| <= 2**-(8P - 1) * max|x_m| * sum_k |scale * c| + 2**-18 * (|x| @ |W|^T)[m, n]``
  (``2**-18`` for the first term too when ``P = 3``): the VNNI schedules write each x as a fixed-point
  integer of ``P`` base-256 digits (``x_digits``, 2 by default) relative to its block's largest |x|,
  off by at most half a step (``2**-(8P)`` of it; with three digits fp32's rounding of the scaled x
  adds about a step), and then sum in fp32; 2**-18 leaves room for fp32's rounding of K = 512 terms.
  The ``fma`` schedule keeps x as it is (the ``P = 3`` bound).
- bf16 x: the output is rounded to bf16 (2**-9 relative), and x keeps 15 bits:
  ``|y - ref| <= 2**-8 |ref| + 2**-13 * max|x_m| * sum_k |scale * c| + 2**-12 * (|x| @ |W|^T)``.
"""
from __future__ import annotations

import pytest
import torch

from kiln.backends.cpu import lowbit as L

VNNI = L.has_vnni()
SCHEDULES = [s for s in L.SCHEDULES if VNNI or s == "fma"]


def spec_planes(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three planes of 8-bit codes ``q [N, K]``, element by element from the layout's spec."""
    n, k = q.shape
    hi = torch.zeros(n, k // 4, dtype=torch.int32)
    mid = torch.zeros(n, k // 4, dtype=torch.int32)
    lo = torch.zeros(n, k // 2, dtype=torch.int32)
    qi = q.to(torch.int32)
    for g in range(k // 128):
        for i in range(4):
            cols = qi[:, g * 128 + i * 32: g * 128 + i * 32 + 32]
            hi[:, g * 32: g * 32 + 32] |= (cols >> 6) << (2 * i)
            mid[:, g * 32: g * 32 + 32] |= ((cols >> 4) & 3) << (2 * i)
        for i in range(2):
            lo[:, g * 64: g * 64 + 64] |= (qi[:, g * 128 + i * 64: g * 128 + i * 64 + 64] & 15) << (4 * i)
    return {"hi": hi.to(torch.uint8), "mid": mid.to(torch.uint8), "lo": lo.to(torch.uint8)}


def spec_codes(planes: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The ``bits``-bit view's codes read back from the planes (by the spec: c2 = hi, c4 = hi<<2 | mid, c8 = q)."""
    hi = planes["hi"].to(torch.int32)
    n = hi.shape[0]
    k = hi.shape[1] * 4

    def two_bit(plane):
        out = torch.empty(n, k, dtype=torch.int32)
        for g in range(k // 128):
            for i in range(4):
                out[:, g * 128 + i * 32: g * 128 + i * 32 + 32] = (plane[:, g * 32: g * 32 + 32] >> (2 * i)) & 3
        return out

    code = two_bit(hi)
    if bits >= 4:
        code = (code << 2) | two_bit(planes["mid"].to(torch.int32))
    if bits == 8:
        lo = planes["lo"].to(torch.int32)
        low = torch.empty(n, k, dtype=torch.int32)
        for g in range(k // 128):
            for i in range(2):
                low[:, g * 128 + i * 64: g * 128 + i * 64 + 64] = (lo[:, g * 64: g * 64 + 64] >> (4 * i)) & 15
        code = (code << 4) | low
    return code


def make_case(m, n, k, g, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // g, generator=gen) * 0.02 + 1e-3).half()
    offset = (torch.randn(n, k // g, generator=gen) * 0.05).half()
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 3).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    return spec_planes(q), scale, offset, x, b


def reference(x, planes, scale, offset, bits, g, b, affine="offset"):
    """Dequantize then matmul (fp64), and what the tolerance is measured against."""
    c = spec_codes(planes, bits).double()
    s = scale.double().repeat_interleave(g, 1)
    if affine == "offset":
        o = offset.double().repeat_interleave(g, 1)
    else:
        step = 2.0 ** (8 - bits)
        o = -s * (offset.double().repeat_interleave(g, 1) - (step - 1) / 2) / step
    w = s * c + o
    xd = x.double()
    y = xd @ w.T + (0 if b is None else b.double())
    sc_sum = (s * c).abs().sum(1)  # [n]
    scale_ref = xd.abs().amax(1, keepdim=True) * sc_sum  # [m, n]
    mag = xd.abs() @ w.abs().T + (0 if b is None else b.double().abs())
    return y, scale_ref, mag


def check(y, ref, scale_ref, mag, dtype, digits=L.X_DIGITS):
    y = y.double()
    if dtype == torch.float32:
        bound = max(2 ** -(8 * digits - 1), 2 ** -18) * scale_ref + 2 ** -18 * mag
    else:
        bound = 2 ** -8 * ref.abs() + 2 ** -13 * scale_ref + 2 ** -12 * mag
    excess = ((y - ref).abs() - bound).max().item()
    assert excess <= 0, f"max error exceeds its bound by {excess:.3g} (max |ref| {ref.abs().max().item():.3g})"


def run_decode(kernel, x, planes, scale, offset, b, bits):
    y = torch.empty(x.shape[0], planes["hi"].shape[0], dtype=x.dtype)
    args = [x] + [planes[p] for p in L.PLANES_OF[bits]] + [scale, offset] + ([b] if b is not None else []) + [y]
    return kernel(*args)


CASES = [(1, 64, 256, 128, False), (3, 128, 512, 256, True), (64, 256, 384, 128, True)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}_n{}_k{}_g{}{}".format(*c[:4], "_bias" if c[4] else ""))
def test_decode_kernel_matches_dequantize_then_matmul(bits, dtype, case):
    m, n, k, g, bias = case
    planes, scale, offset, x, b = make_case(m, n, k, g, dtype, bias, seed=bits)
    kernel = L.build(L.decode_func(m, n, k, bits, group_size=g, dtype=str(dtype).split(".")[1], bias=bias))
    y = run_decode(kernel, x, planes, scale, offset, b, bits)
    assert y.dtype == dtype and y.shape == (m, n)
    check(y, *reference(x, planes, scale, offset, bits, g, b), dtype)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_schedule_matches(schedule, bits, dtype):
    m, n, k, g = 3, 128, 512, 128
    planes, scale, offset, x, b = make_case(m, n, k, g, dtype, True, seed=10 + bits)
    kernel = L.build(L.decode_func(m, n, k, bits, group_size=g, dtype=str(dtype).split(".")[1], bias=True,
                                   schedule=schedule, rows_per_task=16))
    check(run_decode(kernel, x, planes, scale, offset, b, bits), *reference(x, planes, scale, offset, bits, g, b), dtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_x_digits_set_the_precision_of_x(bits):
    """One, two (the default) and three digits of fp32 x: each within its bound, and more digits, less error."""
    m, n, k, g = 2, 64, 512, 128
    planes, scale, offset, x, _ = make_case(m, n, k, g, torch.float32, False, seed=30 + bits)
    ref = reference(x, planes, scale, offset, bits, g, None)
    errors = {}
    for digits in (1, 2, 3):
        y = run_decode(L.build(L.decode_func(m, n, k, bits, group_size=g, x_digits=digits)), x, planes, scale, offset,
                       None, bits)
        check(y, *ref, torch.float32, digits=digits)
        errors[digits] = (y.double() - ref[0]).abs().max().item()
    assert errors[3] < errors[2] < errors[1], errors
    with pytest.raises(ValueError, match="x_digits must be 1, 2 or 3"):
        L.decode_func(m, n, k, bits, x_digits=4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_point_affine(bits):
    """``affine="zero"``: the nested form's ``scale * (c_b - (z - m_b) / 2**(8 - b))`` with the shared 8-bit zero."""
    m, n, k, g = 2, 64, 256, 128
    planes, scale, _, x, _ = make_case(m, n, k, g, torch.float32, False, seed=20 + bits)
    zero = (torch.rand(n, k // g) * 255).half()
    kernel = L.build(L.decode_func(m, n, k, bits, group_size=g, affine="zero"))
    y = run_decode(kernel, x, planes, scale, zero, None, bits)
    check(y, *reference(x, planes, scale, zero, bits, g, None, affine="zero"), torch.float32)


def test_zeros_and_a_zero_block_of_x():
    """An all-zero block of x (its fixed-point step is 0) and all-zero codes give exact results."""
    m, n, k, g = 1, 64, 256, 128
    planes, scale, offset, x, _ = make_case(m, n, k, g, torch.float32, False)
    x[:, :128] = 0
    kernel = L.build(L.decode_func(m, n, k, 4, group_size=g))
    check(run_decode(kernel, x, planes, scale, offset, None, 4), *reference(x, planes, scale, offset, 4, g, None),
          torch.float32)
    zero_planes = {p: torch.zeros_like(t) for p, t in planes.items()}
    y = run_decode(kernel, x, zero_planes, scale, offset, None, 4)
    torch.testing.assert_close(y, x[:, 128:].sum(1, keepdim=True) * offset[:, 1].float().unsqueeze(0), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("affine", ["offset", "zero"])
def test_dequantize_kernel(bits, dtype, affine):
    n, k, g = 96, 512, 256
    planes, scale, offset, _, _ = make_case(1, n, k, g, dtype, False, seed=30 + bits)
    kernel = L.build(L.dequantize_func(n, k, bits, group_size=g, dtype=str(dtype).split(".")[1], affine=affine))
    w = torch.empty(n, k, dtype=dtype)
    kernel(*[planes[p] for p in L.PLANES_OF[bits]], scale, offset, w)
    c = spec_codes(planes, bits).float()
    s = scale.float().repeat_interleave(g, 1)
    if affine == "offset":
        ref = s * c + offset.float().repeat_interleave(g, 1)
    else:
        step = 2.0 ** (8 - bits)
        ref = s * (c - (offset.float().repeat_interleave(g, 1) - (step - 1) / 2) / step)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(w.float(), ref.to(dtype).float(), rtol=tol, atol=1e-6)


@pytest.mark.parametrize("bits, planes", [(2, ["hi"]), (4, ["hi", "mid"]), (8, ["hi", "mid", "lo"])])
@pytest.mark.parametrize("bias", [False, True])
def test_a_view_kernel_takes_only_the_planes_it_reads(bits, planes, bias):
    """The 2-bit function's signature has hi and no other plane; the 4-bit one hi and mid: it cannot read more."""
    func = L.decode_func(1, 64, 256, bits, bias=bias)
    expected = ["x", *planes, "scale", "offset", *(["bias"] if bias else []), "y"]
    assert list(func.attrs["kiln.lowbit_params"]) == expected
    assert len(func.params) == len(expected)
    uint8 = [(name, shape) for name, shape, dtype in _signature(func) if dtype == "uint8"]
    plane_shapes = {"hi": (64, 64), "mid": (64, 64), "lo": (64, 128)}
    assert uint8 == [(p, plane_shapes[p]) for p in planes]
    deq = L.dequantize_func(64, 256, bits)
    assert list(deq.attrs["kiln.lowbit_params"]) == [*planes, "scale", "offset", "w"]
    assert [name for name, _, _ in _signature(deq)] == [*planes, "scale", "offset", "w"]
    kernel = L.build(func)
    with pytest.raises(TypeError, match="takes"):  # a tensor more than the signature is refused before TVM
        kernel(*[torch.empty(1) for _ in range(len(expected) + 1)])


def _signature(func):
    """``(name, shape, dtype)`` of each parameter, from the function's TVMScript."""
    import re
    script = func.script()
    head = script[script.index("def "):script.index("):")]
    return [(name, tuple(int(d) for d in shape.split(",") if d.strip()), dtype)
            for name, shape, dtype in re.findall(r'(\w+): T\.Buffer\(\(([\d, ]+)\), "(\w+)"\)', head)]


def test_spec_reference_agrees_with_kiln_ir_nested():
    """The test's own unpacking and kiln.ir.nested's encoder/unpacker read the same layout."""
    nested = pytest.importorskip("kiln.ir.nested")
    q = torch.randint(0, 256, (16, 384), dtype=torch.uint8)
    ours = spec_planes(q)
    theirs = nested.pack_planes(q)
    for p in ours:
        assert torch.equal(ours[p], theirs[p]), p
    for bits in (2, 4, 8):
        assert torch.equal(spec_codes(ours, bits), nested.unpack_codes(theirs, bits).to(torch.int32))


def test_zero_affine_matches_kiln_ir_nested_dequantize():
    """``affine="zero"`` computes kiln.ir.nested's dequantized view (the op kiln::nested_linear's reference); x in
    three digits, so that what is checked is the view, not x's rounding (``test_x_digits_set_the_precision_of_x``)."""
    nested = pytest.importorskip("kiln.ir.nested")
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    form = nested.encode(w, 128)
    x = torch.randn(2, 256)
    for bits in (2, 4, 8):
        kernel = L.build(L.decode_func(2, 64, 256, bits, affine="zero", x_digits=3))
        y = kernel(x, *form.tensors_for(bits), torch.empty(2, 64))
        ref = x.double() @ form.dequantize(bits).double().T
        assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        L.decode_func(1, 64, 256, 3)
    with pytest.raises(ValueError, match="group size"):
        L.decode_func(1, 64, 256, 4, group_size=96)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        L.decode_func(1, 64, 256, 4, dtype="float16")


class _NestedLinear(torch.nn.Module):
    def __init__(self, form, bits, bias):
        super().__init__()
        self.bits = bits
        for p, t in form.planes.items():
            self.register_buffer(p, t)
        self.register_buffer("scale", form.scales[bits])
        self.register_buffer("zero", form.zero)
        self.bias = torch.nn.Parameter(torch.randn(form.shape[0])) if bias else None

    def forward(self, x):
        planes = [getattr(self, p) if p in L.PLANES_OF[self.bits] else None for p in ("hi", "mid", "lo")]
        return torch.ops.kiln.nested_linear(x, *planes, self.scale, self.zero, self.bias, self.bits, 128)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape, bias", [((2, 256), False), ((1, 3, 256), True), ((2, 16, 256), True)],
                         ids=["decode", "decode_3d_bias", "prefill_bias"])
def test_convert_nested_linear_in_a_relax_module(bits, shape, bias):
    """``convert_nested_linear`` emits kiln::nested_linear as call_tir of the kernels (prefill: the dequantizer
    and the cpu dispatch's GEMM); the Relax VM's result is the op's reference kernel's."""
    import tvm
    from tvm import relax

    import kiln.ir.ops  # noqa: F401  (registers kiln::nested_linear)
    from kiln.runtime.kernels import tvm_dispatch
    nested = pytest.importorskip("kiln.ir.nested")
    torch.manual_seed(bits)
    model = _NestedLinear(nested.encode(torch.randn(64, 256) * 0.02, 128), bits, bias)
    x = torch.randn(*shape)
    ep = torch.export.export(model, (x,))
    gm = ep.graph_module
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.kiln.nested_linear.default)
    assert L.supports_nested_linear(node)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {n: relax.Var(n.name, relax.TensorType(list(n.meta["val"].shape), str(n.meta["val"].dtype).split(".")[1]))
              for n in placeholders}
    bb = relax.BlockBuilder()
    with bb.function("main", list(params.values())):
        with bb.dataflow():
            out = bb.emit_output(L.convert_nested_linear(bb, node, params.__getitem__))
        bb.emit_func_output(out)
    mod = bb.get()
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels and all(mod[name].attrs["tirx.is_scheduled"] for name in kernels)
    tvm_dispatch.register()
    vm = relax.VirtualMachine(tvm.compile(mod, target=L.host_target()), tvm.cpu())
    state = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    specs = {s.arg.name: s.target for s in ep.graph_signature.input_specs}
    args = [x if specs[n.name] is None else state[specs[n.name]].detach() for n in placeholders]
    got = torch.from_dlpack(vm["main"](*[tvm.runtime.from_dlpack(a.contiguous()) for a in args]))
    ref = model(x)
    assert got.shape == ref.shape
    # decode: x in X_DIGITS digits (module docstring's fp32 bound, its first term); prefill: dequantize + GEMM
    codes = spec_codes({p: getattr(model, p) for p in ("hi", "mid", "lo")}, bits).double()
    sc_sum = (model.scale.double().repeat_interleave(128, 1) * codes).abs().sum(1)
    rounding = 2 ** -(8 * L.X_DIGITS - 1) * x.abs().max().item() * sc_sum.max().item() if x.numel() // 256 <= L.DECODE_MAX_ROWS else 0
    assert (got - ref).abs().max().item() <= rounding + 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_non_finite_x_rows_come_out_non_finite_and_leave_other_rows_alone(schedule):
    """A NaN or inf in a row of x makes all that row's outputs non-finite (VNNI: NaN, where eager may give
    +-inf); the other rows are unaffected."""
    m, n, k, g = 3, 64, 256, 128
    planes, scale, offset, x, _ = make_case(m, n, k, g, torch.float32, False)
    x[0, 5], x[1, 200] = float("nan"), float("inf")
    kernel = L.build(L.decode_func(m, n, k, 4, group_size=g, schedule=schedule))
    y = run_decode(kernel, x, planes, scale, offset, None, 4)
    assert not torch.isfinite(y[:2]).any()
    ref, scale_ref, mag = reference(x[2:], planes, scale, offset, 4, g, None)
    check(y[2:], ref, scale_ref, mag, torch.float32)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(128, 256), torch.nn.Linear(256, 128, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("rows", [2, 16], ids=["decode", "prefill"])
def test_compiled_nested_model_runs_the_lowbit_kernels_on_cpu(rows):
    """quantize_nested + target cpu: each plan's kiln::nested_linear nodes run as these kernels inside the TVM
    partition (not on the torch fallback), and give the op's reference kernel's result (target torch)."""
    import kiln
    from kiln import CompileOptions, NestedQuantization

    torch.manual_seed(0)
    model, x = _MLP().eval(), torch.randn(rows, 128)
    options = CompileOptions(quantization=NestedQuantization())
    cm = kiln.compile(model, (x,), target="cpu", options=options)
    ref = kiln.compile(model, (x,), target="torch", options=options)
    for plan, program in cm.manifest["programs"].items():
        tasks = program["tasks"]
        assert [t["backend"] for t in tasks] == ["cpu"], plan
        kernels = [k["name"] for k in tasks[0]["report"]["kernels"]]
        prefix = "kiln_nested_linear" if rows <= L.DECODE_MAX_ROWS else "kiln_nested_dequantize"
        assert sum(name.startswith(prefix) for name in kernels) == 2, (plan, kernels)
        with cm.using(plan=plan), ref.using(plan=plan):
            got, want = cm(x), ref(x)
        # decode rounds x to X_DIGITS base-256 digits of its block's max (2**-16 of it; errors measured here 4-7e-5
        # of max |want|, the codes' sums being large against the zero point); prefill is dequantize + GEMM
        tolerance = 2 ** -12 if rows <= L.DECODE_MAX_ROWS else 1e-5
        assert (got - want).abs().max().item() <= tolerance * want.abs().max().item(), plan
