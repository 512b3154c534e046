"""``kiln::int8_linear``: the NPU's w8a8 linear (static per-tensor activation scale, int32 accumulation)."""
import pytest
import torch

from kiln.ir import ops
from kiln.ir.ops import (OPS, _onednn_int8_is_exact, int8_linear, int8_linear_reference, prepack_int8_linear_weight,
                        quantize_activation)


def _case(rows=(3, 5), k=64, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, k, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    return x, w, s


def test_matches_the_integer_reference_exactly_in_its_integer_part():
    x, w, s = _case()
    x_scale = x.abs().max().item() / 127
    out = torch.ops.kiln.int8_linear(x, w, s, None, x_scale)
    codes = torch.clamp(torch.round(x / x_scale), -127, 127).to(torch.int64)
    acc = codes.reshape(-1, 64) @ w.to(torch.int64).t()  # exact in int64
    ref = (acc.float() * (s * x_scale)).reshape(3, 5, 32)
    assert torch.equal(out, ref)
    assert torch.ops.kiln.int8_linear.default in OPS


def test_activations_beyond_the_scale_saturate():
    x_scale = 0.1
    x = torch.tensor([[100.0, -100.0, 0.04, 0.06]])
    assert quantize_activation(x, x_scale).tolist() == [[127, -127, 0, 1]]


@pytest.mark.parametrize("rows", [(1,), (1, 1), (2, 7), (17,)])
def test_any_row_count_and_bias(rows):
    x, w, s = _case(rows=rows)
    bias = torch.randn(32)
    x_scale = 0.05
    out = torch.ops.kiln.int8_linear(x, w, s, bias, x_scale)
    ref = quantize_activation(x, x_scale).float() @ w.float().t() * (s * x_scale) + bias
    assert out.shape == (*rows, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused_by_name():
    x, w, s = _case()
    with pytest.raises(RuntimeError, match="weight must be int8"):
        torch.ops.kiln.int8_linear(x, w.float(), s, None, 0.1)
    with pytest.raises(RuntimeError, match="x_scale must be > 0"):
        torch.ops.kiln.int8_linear(x, w, s, None, 0.0)
    with pytest.raises(RuntimeError, match="64 features"):
        torch.ops.kiln.int8_linear(x[..., :10], w, s, None, 0.1)


# The prepacked oneDNN kernel (``prepack_int8_linear_weight``): bitwise the reference kernel, or not used.
needs_exact_onednn = pytest.mark.skipif(not _onednn_int8_is_exact(),
                                        reason="this CPU has no VNNI: oneDNN's int8 matmul is not exact here")


def _bitwise_case(m, k, n, *, bias, saturate, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * (50.0 if saturate else 1.0)).to(dtype)
    w = torch.randint(-128 if saturate else -127, 128, (n, k), dtype=torch.int8, generator=g)
    if saturate:  # every product at its extreme: int32 sums far beyond 2**24, where the float32 conversion rounds
        w[: n // 2] = 127
        x[: m // 2 + 1] = 1000.0
    s = (torch.rand(n, generator=g) * 0.01 + 1e-4)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, s, b


@needs_exact_onednn
@pytest.mark.parametrize("m,k,n", [(1, 768, 768), (1, 67, 33), (5, 3, 1), (64, 768, 3072), (17, 3072, 96),
                                   (128, 101, 257), (3, 8192, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("saturate", [False, True])
def test_prepacked_kernel_is_bitwise_the_reference(m, k, n, bias, saturate):
    x, w, s, b = _bitwise_case(m, k, n, bias=bias, saturate=saturate, seed=m + k + n)
    x_scale = 0.02 if saturate else x.abs().max().item() / 127
    ref = int8_linear_reference(x, w, s, b, x_scale)
    assert prepack_int8_linear_weight(w)
    out = torch.ops.kiln.int8_linear(x, w, s, b, x_scale)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert torch.equal(out, int8_linear(x, w, s, b, x_scale))


@needs_exact_onednn
@pytest.mark.parametrize("threads", [1, 2])
def test_prepacked_kernel_is_bitwise_the_reference_on_any_thread_count_and_dtype(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x, w, s, b = _bitwise_case(96, 3072, 512, bias=True, saturate=True, dtype=dtype, seed=threads)
            x = x.reshape(8, 12, 3072)  # leading dims are flattened to rows, and restored
            ref = int8_linear_reference(x, w, s, b, 0.03)
            assert prepack_int8_linear_weight(w)
            out = torch.ops.kiln.int8_linear(x, w, s, b, 0.03)
            assert out.shape == (8, 12, 512) and out.dtype == dtype and torch.equal(out, ref)
    finally:
        torch.set_num_threads(before)


@needs_exact_onednn
def test_a_weight_modified_after_prepacking_is_not_multiplied_stale():
    x, w, s, b = _bitwise_case(4, 64, 32, bias=True, saturate=False)
    assert prepack_int8_linear_weight(w)
    w.neg_()  # bumps the version counter: the packed copy no longer is this weight
    assert torch.equal(torch.ops.kiln.int8_linear(x, w, s, b, 0.01), int8_linear_reference(x, w, s, b, 0.01))
    assert prepack_int8_linear_weight(w)  # packs again
    assert ops._packed_entry(w) is not None
    assert torch.equal(torch.ops.kiln.int8_linear(x, w, s, b, 0.01), int8_linear_reference(x, w, s, b, 0.01))


def test_weights_the_prepacked_kernel_does_not_take_run_the_reference():
    x, w, s, _ = _bitwise_case(4, 64, 32, bias=False, saturate=False)
    strided = torch.randint(-127, 128, (64, 32), dtype=torch.int8).t()  # not contiguous
    assert not prepack_int8_linear_weight(strided)
    assert not prepack_int8_linear_weight(torch.zeros(0, 64, dtype=torch.int8))
    with torch.inference_mode():
        frozen = w.clone()
    assert not prepack_int8_linear_weight(frozen)
    for weight in (strided, frozen):
        assert torch.equal(torch.ops.kiln.int8_linear(x, weight, s, None, 0.01),
                           int8_linear_reference(x, weight, s, None, 0.01))
    empty = torch.ops.kiln.int8_linear(x[:0], w, s, None, 0.01)  # no rows
    assert empty.shape == (0, 32)


def test_without_vnni_nothing_is_prepacked(monkeypatch):
    monkeypatch.setattr(ops, "_onednn_exact", False)
    _, w, _, _ = _bitwise_case(4, 64, 32, bias=False, saturate=False)
    assert not prepack_int8_linear_weight(w)


class _NpuLinear(torch.nn.Module):
    def __init__(self, k=96, n=160):
        super().__init__()
        _, w, s, b = _bitwise_case(1, k, n, bias=True, saturate=True, seed=7)
        self.register_buffer("w", w)
        self.register_buffer("s", s)
        self.register_buffer("b", b)

    def forward(self, x):
        return torch.ops.kiln.int8_linear(x, self.w, self.s, self.b, 0.02) * 2


@needs_exact_onednn
def test_the_npu_loader_prepacks_its_int8_weights_once_and_stays_bitwise_eager(monkeypatch):
    import kiln

    m = _NpuLinear().eval()
    x = torch.randn(6, 96) * 10
    assert ops._packed_entry(m.w) is None  # eager's own weight: never prepacked, the reference kernel runs
    c = kiln.compile(m, (x,), target="npu")
    assert c.manifest["programs"]["main"]["tasks"][0]["backend"] == "npu"
    weights = [entry[0]() for entry in list(ops._PACKED.values())]
    packed = [w for w in weights if w is not None and w.shape == m.w.shape and torch.equal(w, m.w)]
    assert len(packed) == 1 and ops._packed_entry(packed[0]) is not None  # the npu task's weight, packed at load
    expected = m(x)
    reference_calls = []

    def counted(*args):
        reference_calls.append(args)
        return int8_linear_reference(*args)

    monkeypatch.setattr(ops, "int8_linear_reference", counted)
    for _ in range(2):
        assert torch.equal(c(x), expected)
    assert reference_calls == []  # the compiled npu task ran the prepacked kernel


@needs_exact_onednn
def test_prepacked_kernel_is_bitwise_the_reference_for_any_scale():
    """oneDNN multiplies by the reference's own scale vector: zeros, subnormals, overflow to inf, NaN alike."""
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        m, k, n = (1, 64, 128, 3)[seed % 4], (768, 67, 3072, 5, 1)[seed % 5], (33, 96, 257, 768)[seed % 4]
        x = torch.randn(m, k, generator=g) * 10.0 ** (seed % 3)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 10.0 ** torch.randint(-40, 38, (n,), generator=g).float()
        s[:4] = torch.tensor([0.0, 1e-45, 3e38, float("nan")])[: min(4, n)]
        b = torch.randn(n, generator=g) if seed % 2 else None
        x_scale = (1e-30, 1e-6, 0.01, 3.0, 1e20)[seed % 5]
        ref = int8_linear_reference(x, w, s, b, x_scale)
        assert prepack_int8_linear_weight(w)
        out = torch.ops.kiln.int8_linear(x, w, s, b, x_scale)
        assert torch.equal(out.nan_to_num(), ref.nan_to_num()) and torch.equal(out.isnan(), ref.isnan()), seed


@pytest.mark.parametrize("m,n", [(1, 64), (5, 300), (1, 1)])
def test_one_input_feature_is_exact(m, n):
    """torch's CPU ``_int_mm`` returns uninitialized memory for K == 1 (N > 1); the op must not."""
    x = torch.randn(m, 1) * 3
    w = torch.randint(-128, 128, (n, 1), dtype=torch.int8)
    s = torch.rand(n) + 0.5
    exact = quantize_activation(x, 0.02).double() @ w.double().t()  # |acc| <= 127 * 128: exact in float64
    for kernel in (int8_linear_reference, torch.ops.kiln.int8_linear):
        assert torch.equal(kernel(x, w, s, None, 0.02), exact.float() * (s * 0.02))
    if _onednn_int8_is_exact():
        assert prepack_int8_linear_weight(w)
        assert torch.equal(torch.ops.kiln.int8_linear(x, w, s, None, 0.02), int8_linear_reference(x, w, s, None, 0.02))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_prepacked_kernels_quantizer_is_bitwise_quantize_activation(dtype, monkeypatch):
    g = torch.Generator().manual_seed(1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.5,
                            -127.5, 1e30, -1e30, 0.0, -0.0, 1e-45])
    for x_scale in (0.02, 1.0, 1e-30, 3.7, 1e20):
        values = torch.randn(4000, generator=g) * 10.0 ** torch.randint(-3, 4, (4000,), generator=g)
        x = torch.cat([values, special, torch.arange(-300, 300) * 0.5 * x_scale]).to(dtype).reshape(-1, 4)
        monkeypatch.setattr(ops, "_SCRATCH_MIN", 0)
        assert torch.equal(ops._quantize_rows_into_scratch(x, x_scale), quantize_activation(x, x_scale))
        assert torch.equal(ops._quantize_rows_into_scratch(x[:3], x_scale), quantize_activation(x[:3], x_scale))
        assert torch.equal(ops._quantize_rows_into_scratch(x.t(), x_scale), quantize_activation(x.t(), x_scale))
        assert torch.equal(quantize_activation(x, x_scale),
                           torch.clamp(torch.round(x.float() / x_scale), -127, 127).to(torch.int8))
    reference = torch.clamp(torch.round(x.float() / 0.1), -127, 127).to(torch.int8)  # the contract, out of place
    assert torch.equal(quantize_activation(x, 0.1), reference)
    monkeypatch.setattr(ops, "_SCRATCH_MIN", 0)  # in the scratch buffers, whatever the size
    assert torch.equal(ops._quantize_rows_into_scratch(x, 0.1), reference)
    monkeypatch.setattr(ops, "_SCRATCH_MAX", 10)  # beyond the cap: fresh buffers, the same codes
    assert torch.equal(ops._quantize_rows_into_scratch(x, 0.1), reference)


@needs_exact_onednn
def test_concurrent_calls_from_threads_are_each_bitwise_the_reference():
    import concurrent.futures

    cases = [_bitwise_case(m, 256, 96, bias=True, saturate=bool(m % 2), seed=m) for m in (1, 7, 64, 33)]
    for _, w, _, _ in cases:
        assert prepack_int8_linear_weight(w)
    refs = [int8_linear_reference(x, w, s, b, 0.05) for x, w, s, b in cases]

    def run(i):
        x, w, s, b = cases[i % len(cases)]
        return all(torch.equal(torch.ops.kiln.int8_linear(x, w, s, b, 0.05), refs[i % len(cases)]) for _ in range(20))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(16)))


@needs_exact_onednn
def test_a_packed_weight_leaves_the_cache_with_its_tensor():
    import gc

    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    assert prepack_int8_linear_weight(w)
    key = id(w)
    assert key in ops._PACKED
    del w
    gc.collect()
    assert key not in ops._PACKED


@needs_exact_onednn
def test_with_onednn_masked_to_avx2_the_reference_runs():
    """``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN's s8 x s8 matmul inexact: nothing is prepacked, results stay exact."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from kiln.ir import ops\n"
        "w = torch.randint(-128, 128, (48, 320), dtype=torch.int8)\n"
        "x = torch.randn(5, 320) * 100\n"
        "s = torch.rand(48)\n"
        "assert not ops.prepack_int8_linear_weight(w)\n"
        "assert torch.equal(torch.ops.kiln.int8_linear(x, w, s, None, 0.1), ops.int8_linear_reference(x, w, s, None, 0.1))\n"
        "print('reference')\n"
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "reference"
    assert ops._onednn_int8_self_test()  # in this process (oneDNN unmasked) the self-test passes


@pytest.mark.parametrize("bias", [False, True])
def test_the_reference_is_the_contracts_arithmetic_out_of_place(bias):
    x, w, s, b = _bitwise_case(33, 3072, 200, bias=bias, saturate=True, dtype=torch.bfloat16)
    codes = torch.clamp(torch.round(x.float() / 0.02), -127, 127).to(torch.int8)
    out = torch._int_mm(codes, w.t()).to(torch.float32) * (s * 0.02)
    if bias:
        out = out + b.float()
    assert torch.equal(int8_linear_reference(x, w, s, b, 0.02), out.to(torch.bfloat16))
