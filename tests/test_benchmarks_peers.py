"""benchmarks/peers.py: the fidelity metrics, OpenVINO precision read-back, failure reporting, and (with the
``bench`` extra) ONNX Runtime and OpenVINO built on a small zoo model and checked against eager."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers  # noqa: E402
from kiln import zoo  # noqa: E402


def test_top_token_agreement_counts_every_position():
    ref = torch.zeros(1, 4, 10)
    ref[0, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0
    out = ref.clone()
    out[0, 2, 9] = 2.0  # position 2 now picks token 9
    assert peers.top_token_agreement(ref, ref) == 1.0
    assert peers.top_token_agreement(ref, out) == 0.75
    with pytest.raises(ValueError, match="shape"):
        peers.top_token_agreement(ref, out[:, :3])


def test_embedding_cosine_pools_only_unmasked_positions_and_reports_the_worst_row():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 6, 8, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    out = ref.clone()
    out[1, 4:] = 100.0  # padding only: the pooled embedding does not change
    assert peers.embedding_cosine(ref, out, mask) == pytest.approx(1.0, abs=1e-12)
    assert peers.embedding_cosine(ref, out) < 0.99  # without the mask the padding counts
    worse = ref.clone()
    worse[0] = -worse[0]  # row 0 reversed: the worst row decides
    assert peers.embedding_cosine(ref, worse, mask) == pytest.approx(-1.0)


def test_fidelity_picks_the_metric_from_the_output_kind():
    from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

    hidden, pooled = torch.randn(1, 5, 4), torch.randn(1, 4)
    enc = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
    fid = peers.fidelity(enc, [hidden + 1e-3, pooled], (torch.ones(1, 5, dtype=torch.long),) * 2)
    assert fid.metric == "cosine" and fid.value > 0.999 and fid.max_abs == pytest.approx(1e-3, rel=1e-3)

    logits = torch.randn(1, 5, 16)
    lm = CausalLMOutputWithPast(logits=logits)
    fid = peers.fidelity(lm, [logits], (torch.zeros(1, 5, dtype=torch.long),))
    assert (fid.metric, fid.value, fid.max_abs, str(fid)) == ("top-token", 1.0, 0.0, "top-token 100.0%")

    with pytest.raises(ValueError, match="2 outputs, eager has 1"):
        peers.fidelity(lm, [logits, logits], ())
    with pytest.raises(ValueError, match="shape"):
        peers.fidelity(lm, [logits[:, :4]], ())


def test_summarize_precisions_counts_gemm_layers_by_runtime_precision():
    layers = [("FullyConnected", "bf16")] * 3 + [("FullyConnected", "f32"), ("LLMMLP", "bf16"), ("Softmax", "f32")]
    assert peers.summarize_precisions("bf16", layers) == "bf16 (FullyConnected 3/4 bf16, 1/4 f32; LLMMLP 1/1 bf16)"
    assert peers.summarize_precisions("f32", [("Softmax", "f32")]) == "f32"


def test_one_line_keeps_the_converters_telling_line():
    exc = RuntimeError("Check 'false' failed at unconverted_ops_report.cpp:151:\nFrontEnd API failed\n"
                       "Summary:\n-- No conversion rule found for operations: aten::diff\n-- Conversion is failed\n")
    assert peers.one_line(exc) == "RuntimeError: No conversion rule found for operations: aten::diff"
    assert peers.one_line(ValueError("x" * 500)).endswith("...") and len(peers.one_line(ValueError("x" * 500))) == 200
    assert peers.one_line(KeyError()) == "KeyError"
    onnx = ConnectionError("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m of exporting.\n## Exception summary\n"
                           "<class 'torch.onnx._internal.exporter._errors.DispatchError'>: No ONNX function found for "
                           "<OpOverload(op='transformers.grouped_mm_fallback')>.\n")
    assert peers.one_line(onnx) == ("ConnectionError: DispatchError: No ONNX function found for "
                                    "<OpOverload(op='transformers.grouped_mm_fallback')>.")
    assert "\x1b" not in peers.one_line(ConnectionError("\x1b[96mstep\x1b[0m"))


def test_a_peer_that_is_missing_or_fails_is_a_one_line_reason_and_the_others_go_on(monkeypatch):
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else object())

    def broken_export(*args):
        raise RuntimeError("export exploded\nwith a long story")
    monkeypatch.setattr(peers, "_ort", broken_export)
    built, failed = peers.build(peers.PEERS, torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    assert built == {}
    assert failed == {"ort": "RuntimeError: export exploded",
                      "ov-f32": "not installed: openvino (pip install -e '.[bench]')",
                      "ov": "not installed: openvino (pip install -e '.[bench]')"}
    assert "openvino" not in " ".join(peers.installed())
    with pytest.raises(ValueError, match="unknown peer 'trt'"):
        peers.missing("trt")


def _cpu_flags() -> set[str]:
    try:
        return {w for line in open("/proc/cpuinfo") if line.startswith("flags") for w in line.split()}
    except OSError:
        return set()


def test_peers_run_a_padded_bert_batch_like_eager():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("openvino")
    model, inputs = zoo.bert(seq=16, batch=2)  # row 1 tail-padded: the mask must reach every peer
    with torch.no_grad():
        eager = model(*inputs)
    built, failed = peers.build(peers.PEERS, model, inputs)
    assert failed == {} and set(built) == set(peers.PEERS)
    for name in ("ort", "ov-f32"):
        outputs = built[name].outputs()
        for ref, out in zip((eager.last_hidden_state, eager.pooler_output), outputs):
            torch.testing.assert_close(out, ref)  # fp32 tolerance
        assert built[name].precision == "f32"
    assert "precision f32 (FullyConnected" in built["ov-f32"].note
    fid = peers.fidelity(eager, built["ov"].outputs(), inputs)
    assert fid.metric == "cosine" and fid.value > 0.999
    if "amx_bf16" in _cpu_flags():  # OpenVINO's default on AMX machines; elsewhere it may stay f32
        assert built["ov"].precision == "bf16" and "bf16)" in built["ov"].note
