"""bf16 models on the ``cpu`` target: compiled like fp32, judged against an fp32 reference.

A bf16 model's error against fp32 is the dtype's, not kiln's: each case
measures eager bf16's error and kiln's against the same model in fp32 (same,
bf16-rounded weights), and kiln's may not exceed eager's by more than half
again plus bf16's rounding at the output's scale. GEMMs and attention run on
PyTorch's bf16 kernels; every other op computes in fp32 and rounds to bf16,
as PyTorch's own kernels do.
"""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln import zoo


def _main(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_bf16_zoo_model_is_as_close_to_fp32_as_eager(name):
    model, inputs = zoo.MODELS[name]()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    model = model.to(torch.bfloat16)
    bf16_inputs = tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs)
    cm = kiln.compile(model, bf16_inputs, target="cpu")
    with torch.no_grad():
        eager = _main(model(*bf16_inputs)).float()
        reference = _main(model.float()(*(x.float() if x.is_floating_point() else x for x in bf16_inputs)))
    got = _main(cm(*bf16_inputs))
    assert got.dtype == torch.bfloat16
    eager_error = (eager - reference).abs().max().item()
    kiln_error = (got.float() - reference).abs().max().item()
    rounding = reference.abs().max().item() * 2 ** -8  # one bf16 ulp at the output's scale
    assert kiln_error <= 1.5 * eager_error + rounding, (kiln_error, eager_error)
    assert all(p["backend"] == "cpu" for p in cm.manifest["partitions"]), cm.manifest["partitions"]
