"""The TVM CPU lowering: small graphs through lower_partition -> bytes -> file -> TvmVmKernel, against eager."""
import math
import copy

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.export.graph_signature import InputKind

from kiln.backends.cpu.dispatch import ALL_RULES
from kiln.backends.cpu.target import CpuTarget
from kiln.backends.tvm import lower_partition
from kiln.errors import ArtifactError, UnsupportedOpError
from kiln.runtime.kernels import tvm_dispatch
from kiln.runtime.kernels.tvm_vm import TvmVmKernel

aten = torch.ops.aten


def export_partition(model: nn.Module, args: tuple) -> tuple[fx.GraphModule, int, dict]:
    """The whole model as one partition: placeholders are the inputs, then the weights by name."""
    ep = torch.export.export(model, args).run_decompositions({})
    old = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs, weights = [], {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(spec.arg.name)
        else:
            value = ep.state_dict.get(spec.target)
            weights[spec.arg.name] = (value if value is not None else ep.constants[spec.target]).detach()
    graph, env = fx.Graph(), {}
    for name in inputs + list(weights):
        env[old[name]] = graph.placeholder(name)
        env[old[name]].meta = dict(old[name].meta)
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(nn.Module(), graph), len(inputs), weights


def run_lowered(lowered, weights, inputs, tmp_path):
    path = tmp_path / "lib.so"
    path.write_bytes(lowered.library)
    return TvmVmKernel(lowered.spec, str(path), weights)(list(inputs))


def check(model, args, tmp_path, gemm_kernels="mkl", **tol):
    """Lower ``model`` and compare with eager; GEMMs on eager's kernel unless told (names in reports are fixed)."""
    gm, n, weights = export_partition(model, args)
    before = gm.graph.python_code("self").src
    lowered = lower_partition(gm, n, weights, CpuTarget(gemm_kernels=gemm_kernels))
    assert gm.graph.python_code("self").src == before, "lower_partition mutated its input"
    got = run_lowered(lowered, weights, args, tmp_path)
    with torch.no_grad():
        want = model(*args)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    return lowered


class RMSNormResidual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x, r):
        h = x + r
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * y, h


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x, mask):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


def test_linear_gelu_mlp_dispatches_gemms_and_compiles_gelu(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    lowered = check(mlp, (torch.randn(4, 16, 32),), tmp_path)
    assert lowered.spec["report"]["dispatched"] == {"kiln.linear_bias": 2}
    hows = {r["op"]: r["how"] for r in lowered.spec["report"]["nodes"]}
    assert hows == {"aten.linear.default": "dispatch", "aten.gelu.default": "tir"}
    assert [k["schedule"] for k in lowered.spec["report"]["kernels"]] == ["kiln.Elementwise"]


def test_transcendentals_use_fast_tir_within_fp32_tolerance(tmp_path):
    class Activations(nn.Module):
        def forward(self, x):
            f = nn.functional
            return (f.silu(x), torch.sigmoid(x), torch.exp(x), torch.tanh(x), torch.erf(x),
                    f.gelu(x), f.gelu(x, approximate="tanh"))

    lowered = check(Activations(), (torch.randn(64, 256) * 3,), tmp_path)
    assert lowered.spec["report"]["dispatched"] == {}
    # No scalar libm call is left: each function is an inlined polynomial the vectorizer handles.
    assert not [k for k, text in lowered.kernels.items() for fn in ("exp", "tanh", "erf") if f"T.{fn}(" in text]


def test_residual_add_and_rmsnorm_fuse_into_one_vectorized_kernel(tmp_path):
    torch.manual_seed(0)
    x, r = torch.randn(2, 64, 256), torch.randn(2, 64, 256)
    # TVM sums the row in another order than PyTorch: allow a few ulps more than the fp32 default.
    lowered = check(RMSNormResidual(256).eval(), (x, r), tmp_path, rtol=1e-5, atol=1e-5)
    report = lowered.spec["report"]
    assert report["dispatched"] == {}
    assert report["fused_patterns"] == {"kiln.add_rms_norm": 1}
    # One kernel writes both the residual sum and the normalized rows.
    assert [k["schedule"] for k in report["kernels"]] == ["kiln.RowReduction"], report["kernels"]
    # Row sums accumulate as vectors (rows go parallel only above PARALLEL_MIN_ELEMENTS).
    assert "_rf" in lowered.tir(report["kernels"][0]["name"]) and "T.vectorized" in lowered.tir(report["kernels"][0]["name"])


def _block_iterations(tir: str) -> dict[str, int]:
    """Each block of a scheduled kernel: how many times its body runs (the product of its loops' extents)."""
    from tvm import s_tir
    import tvm.script

    sch = s_tir.Schedule(tvm.script.from_source(tir))
    counts = {}

    def visit(block):
        name = sch.get(block).name_hint
        counts[name] = math.prod(int(sch.get(lp).extent) for lp in sch.get_loops(block))
        for child in sch.get_child_blocks(block):
            visit(child)
    for child in sch.get_child_blocks(sch.get_sblock("root")):
        visit(child)
    return counts


@pytest.mark.parametrize("shape", [(1, 1, 512), (512,), (3, 1, 512)])
def test_a_norm_over_one_row_sums_the_row_once(tmp_path, shape):
    # A decode step's RMS norm ([1, 1, d]) was scheduled with the whole reduction computed under the loop over
    # the row's d elements: d^2 work, 0.34 ms for d = 2048 (6x a 4-bit GEMV of that row's weights).
    torch.manual_seed(0)
    x, r = torch.randn(*shape), torch.randn(*shape)
    lowered = check(RMSNormResidual(shape[-1]).eval(), (x, r), tmp_path, rtol=1e-5, atol=1e-5)
    (kernel,) = lowered.spec["report"]["kernels"]
    assert kernel["schedule"] == "kiln.RowReduction"
    counts = _block_iterations(lowered.tir(kernel["name"]))
    assert counts and max(counts.values()) <= x.numel(), counts


def test_residual_add_and_layer_norm_fuse(tmp_path):
    class AddLayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(128)

        def forward(self, x, r):
            h = x + r
            return self.ln(h), h

    torch.manual_seed(0)
    lowered = check(AddLayerNorm().eval(), (torch.randn(3, 40, 128), torch.randn(3, 40, 128)), tmp_path,
                    rtol=1e-5, atol=1e-5)
    assert lowered.spec["report"]["fused_patterns"] == {"kiln.add_layer_norm": 1}
    assert len(lowered.spec["report"]["kernels"]) == 1


def test_attention_with_bool_mask_goes_to_sdpa(tmp_path):
    # Heads 64 wide: PyTorch's attention (the cpu target's own prefill kernel takes heads up to 32 wide:
    # tests/backends/test_prefill_attention.py)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 256)
    mask = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 1, 16, 16)
    lowered = check(Attention(256, 4).eval(), (x, mask), tmp_path)
    assert lowered.spec["report"]["dispatched"] == {"kiln.linear_bias": 2, "kiln.sdpa_mask_bshd": 1}
    # The head split/merge transposes are strided views in the attention call, not TIR copies.
    assert not [k["name"] for k in lowered.spec["report"]["kernels"] if "transpose" in k["name"]]
    merged = [r for r in lowered.spec["report"]["nodes"] if r["how"] == "view"]
    assert [r["op"] for r in merged] == ["aten.transpose.int"]


def test_attention_mask_without_padding_at_run_time(tmp_path):
    # An all-True mask input (an encoder given an all-ones attention mask) gives the unmasked result.
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    check(Attention(64, 4).eval(), (x, torch.ones(2, 1, 16, 16, dtype=torch.bool)), tmp_path)


def test_constant_causal_mask_becomes_is_causal(tmp_path):
    class Causal(Attention):
        def forward(self, x):
            return super().forward(x, torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril())

    torch.manual_seed(0)
    lowered = check(Causal(64, 4).eval(), (torch.randn(1, 16, 64),), tmp_path)
    assert lowered.spec["report"]["dispatched"] == {"kiln.linear_bias": 2, "kiln.sdpa_bshd": 1}


def test_constant_all_true_attention_mask_is_dropped(tmp_path):
    class NoPadding(Attention):
        def forward(self, x):
            return super().forward(x, torch.ones(x.shape[1], x.shape[1], dtype=torch.bool))

    torch.manual_seed(0)
    lowered = check(NoPadding(64, 4).eval(), (torch.randn(1, 16, 64),), tmp_path)
    assert lowered.spec["report"]["dispatched"] == {"kiln.linear_bias": 2, "kiln.sdpa_bshd": 1}


def test_gap_cumsum_of_bool(tmp_path):
    class M(nn.Module):
        def forward(self, x):
            return (x > 0).cumsum(-1), (x > 0).cumsum(0).to(torch.float32) * x

    lowered = check(M(), (torch.randn(4, 33),), tmp_path)
    assert lowered.spec["outputs"][0]["dtype"] == "i64"  # kiln's dtype names, as the rest of the manifest
    assert [t["dtype"] for t in lowered.spec["inputs"] + lowered.spec["outputs"]] == ["f32", "i64", "f32"]


def test_gap_cat_with_empty_tensor(tmp_path):
    class M(nn.Module):
        def forward(self, x):
            return torch.cat([x[:, :0], x * 2, x[:, :0]], dim=1), torch.cat([x[:0], x], dim=0)

    check(M(), (torch.randn(3, 8),), tmp_path)


def test_gap_select_with_a_negative_index_is_exact(tmp_path):
    # TVM's converter used an unchecked take: x[:, -1] (last-token pooling) read out of bounds.
    class M(nn.Module):
        def forward(self, x):
            return x[:, -1, :] * 2 + x[:, 0, :], x[-1, 1:3], x[0, -5]

    lowered = check(M(), (torch.randn(2, 5, 3),), tmp_path, rtol=0, atol=0)
    assert not any("take" in k["name"] for k in lowered.spec["report"]["kernels"])


def test_gap_clamp_with_one_bound_on_integers(tmp_path):
    # The frontend filled the missing bound with infinity, which no integer dtype holds.
    class M(nn.Module):
        def forward(self, x, pos):
            shifted = pos + torch.arange(6) - 3
            return x * 2, shifted.clamp(min=0), shifted.clamp(max=1), x.clamp(min=0.5), x.clamp(-0.5, 0.25)

    check(M(), (torch.randn(2, 6), torch.tensor(1)), tmp_path, rtol=0, atol=0)


def test_gap_dynamic_sequence_length_is_refused_with_buckets_advice():
    mlp = nn.Sequential(nn.Linear(8, 8)).eval()
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(mlp, (torch.randn(1, 16, 8),), dynamic_shapes=({1: seq},)).run_decompositions({})
    gm = fx.GraphModule(nn.Module(), ep.graph)
    weights = {s.arg.name: ep.state_dict[s.target] for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    with pytest.raises(UnsupportedOpError, match="dynamic shape.*shape bucket"):
        lower_partition(gm, 0, weights, CpuTarget())


def _inplace_graph(mutate_input: bool) -> fx.GraphModule:
    # torch.export functionalizes in-place ops away, so build the partition by hand,
    # as a pass that emits in-place updates would.
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4, 8)
    buf = x if mutate_input else g.call_function(aten.clone.default, (x,))
    upd = g.call_function(aten.add_.Tensor, (buf, 1.0))
    out = g.call_function(aten.mul.Tensor, (buf, 2.0))  # reads the buffer after the update
    for node in (buf, upd, out):
        node.meta["val"] = torch.empty(4, 8)
    g.output((out, upd))
    return fx.GraphModule(nn.Module(), g)


def test_gap_inplace_update_is_kept(tmp_path):
    gm = _inplace_graph(mutate_input=False)
    x = torch.randn(4, 8)
    want = gm(x.clone())
    got = run_lowered(lower_partition(gm, 1, {}, CpuTarget()), {}, [x], tmp_path)
    torch.testing.assert_close(got, list(want))
    torch.testing.assert_close(got[0], (x + 1) * 2)


def test_gap_inplace_update_of_an_input_is_refused():
    with pytest.raises(UnsupportedOpError, match="writes to input x"):
        lower_partition(_inplace_graph(mutate_input=True), 1, {}, CpuTarget())


def test_every_dispatch_rule_has_a_runtime_function():
    assert {r.function for r in ALL_RULES} <= set(tvm_dispatch.FUNCTIONS)


def test_version_and_cpu_mismatch_are_refused(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).eval()
    gm, n, weights = export_partition(lin, (torch.randn(2, 8),))
    lowered = lower_partition(gm, n, weights, CpuTarget())
    path = tmp_path / "lib.so"
    path.write_bytes(lowered.library)
    for key, value, message in [("tvm_version", "0.0.1", r"built for TVM '0\.0\.1' \(this runtime has TVM '0\.27"),
                                ("mcpu", "bogus-cpu", r"built for CPU 'bogus-cpu' \(this machine is "),
                                ("dispatch_abi", 1, r"built for kiln's dispatch functions ABI 1 \(this runtime has ABI ")]:
        spec = copy.deepcopy(lowered.spec)
        spec[key] = value
        with pytest.raises(ArtifactError, match=message):
            TvmVmKernel(spec, str(path), weights)


def test_misaligned_weights_are_accepted(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).eval()
    gm, n, weights = export_partition(lin, (torch.randn(2, 8),))
    lowered = lower_partition(gm, n, weights, CpuTarget())
    # A weight that starts 4 bytes into its storage, as memory-mapped safetensors often do.
    shifted = {k: torch.cat([torch.zeros(1), v.flatten()])[1:].view(v.shape) for k, v in weights.items()}
    assert any(v.data_ptr() % 64 for v in shifted.values())
    x = torch.randn(2, 8)
    torch.testing.assert_close(run_lowered(lowered, shifted, [x], tmp_path)[0], lin(x).detach())


def test_outputs_of_two_calls_do_not_alias(tmp_path):
    class M(nn.Module):
        def forward(self, x):
            return (x * 3,)

    gm, n, weights = export_partition(M(), (torch.randn(4, 4),))
    lowered = lower_partition(gm, n, weights, CpuTarget())
    path = tmp_path / "lib.so"
    path.write_bytes(lowered.library)
    kernel = TvmVmKernel(lowered.spec, str(path), weights)
    a, b = torch.ones(4, 4), torch.full((4, 4), 2.0)
    first = kernel([a])[0]
    kernel([b])
    torch.testing.assert_close(first, a * 3)

