"""bf16 mode's fidelity on the zoo Llama, over many prompts: top-token agreement with eager fp32.

``compiled_vs_eager.py --precision bf16`` measures top-token agreement on one
prompt (128 positions), where one position is 0.8%: too coarse for a 99%
target. This script takes ``--prompts`` random prompts (the first is the
benchmark's) and prints, for each contender, the agreement over all their
positions, the logits' relative RMS error against fp32, and how many
positions are near ties in fp32 (top-two margin under 0.02).

Contenders:

- ``kiln-bf16``: ``CompileOptions(precision="bf16")``;
- ``ov``: OpenVINO at its default precision (bf16 on AMX), when the ``bench``
  extra is installed;
- two eager emulations of bf16 GEMMs, to show where the misses come from:
  ``emulated, fp32 out`` rounds each linear's input and weight to bf16 and
  keeps its fp32 accumulator (what a GEMM writing fp32 gives);
  ``emulated, bf16 out`` also rounds each linear's output to bf16 (what
  PyTorch's CPU bf16 GEMMs give: none of them writes fp32 from bf16 inputs).

    .venv/bin/python benchmarks/bf16_fidelity.py [--prompts 8]

Nothing is timed; every number is measured on this machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kiln  # noqa: E402
from kiln import timing  # noqa: E402

import compiled_vs_eager as cve  # noqa: E402
import peers  # noqa: E402


def _logits(out) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out[0]).float()


def _emulated(model: torch.nn.Module, round_output: bool):
    """``model``'s forward with every ``nn.Linear`` as a bf16 GEMM (inputs and weight rounded to bf16, fp32
    accumulation), its output rounded to bf16 too when ``round_output``."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def bf16_linear(module, args, _output):
        y = F.linear(args[0].bfloat16().float(), module.weight.bfloat16().float(),
                     None if module.bias is None else module.bias.bfloat16().float())
        return y.bfloat16().float() if round_output else y

    def run(ids):
        hooks = [m.register_forward_hook(bf16_linear) for m in linears]
        try:
            with torch.no_grad():
                return _logits(model(ids, use_cache=False))
        finally:
            for h in hooks:
                h.remove()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts of 128 tokens (the first: the benchmark's)")
    parser.add_argument("--seed", type=int, default=123, help="seed of the random prompts after the first")
    args = parser.parse_args()
    print(f"machine: {timing.machine()}; torch {torch.__version__}, kiln {kiln.__version__}")
    factory, kwargs, shape = cve.MODELS["llama"]
    torch.manual_seed(0)
    model, inputs = factory(**kwargs)
    cm = kiln.compile(model, inputs, options=kiln.CompileOptions(precision="bf16"))
    stats = next(p["stats"] for p in cm.manifest["passes"] if p["name"] == "lower_precision")
    if stats["precision"] != "bf16":
        print(f"kiln-bf16 compiled {stats['precision']} here: {stats.get('reason')}")
    contenders = {"kiln-bf16": lambda ids: _logits(cm(ids))}
    why = peers.missing("ov")
    if why is None:
        import openvino

        try:
            ov_model, how = peers.ov_convert(model, inputs)
            compiled = peers.ov_compile(ov_model, "ov", torch.get_num_threads())
            contenders["ov"] = lambda ids: torch.from_numpy(compiled([ids.numpy()])[0].copy()).float()
            print(f"ov: {how}; openvino {openvino.__version__.split('-')[0]}, precision {peers.ov_precision(compiled)}")
        except Exception as exc:  # reported, not fatal
            why = peers.one_line(exc)
    if why is not None:
        print(f"ov not run: {why}")
    contenders["emulated, fp32 out"] = _emulated(model, round_output=False)
    contenders["emulated, bf16 out"] = _emulated(model, round_output=True)

    g = torch.Generator().manual_seed(args.seed)
    prompts = [inputs[0]] + [torch.randint(0, kwargs["vocab"], inputs[0].shape, generator=g)
                             for _ in range(args.prompts - 1)]
    agree = dict.fromkeys(contenders, 0)
    first = dict.fromkeys(contenders, 0)
    err = dict.fromkeys(contenders, 0.0)
    positions = ties = 0
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = _logits(model(ids, use_cache=False))
        top2 = ref.topk(2, -1).values
        ties += int((top2[..., 0] - top2[..., 1] < 0.02).sum())
        positions += ref.shape[:-1].numel()
        for name, run in contenders.items():
            out = run(ids)
            hits = int((out.argmax(-1) == ref.argmax(-1)).sum())
            agree[name] += hits
            first[name] += hits if i == 0 else 0
            err[name] += float(((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt()) / len(prompts)
    per_prompt = prompts[0].shape.numel()
    print(f"llama ({shape}), {len(prompts)} prompts, {positions} positions; near ties in fp32 "
          f"(top-two margin < 0.02): {ties}")
    for name in contenders:
        print(f"  {name:20s} top-token {100 * agree[name] / positions:5.1f}% ({agree[name]}/{positions}); "
              f"first prompt {first[name]}/{per_prompt}; logits' relative RMS error {err[name]:.2e}")


if __name__ == "__main__":
    main()
