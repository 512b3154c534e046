"""Behaviour cloning of the VLA-shaped policy on expert demonstrations (teacher-forced action tokens)."""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import VLAConfig, VLAPolicy, obs_features
from .tokens import InstructionTokenizer, actions_to_tokens, instruction


@dataclass
class TrainConfig:
    steps: int = 3000
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    label_sigma: float = 1.0     # Gaussian soft labels over neighbouring bins (0: one-hot)
    obs_noise: float = 0.0       # Gaussian noise on the observation during training (metres)
    seed: int = 0


def soft_targets(tokens: torch.Tensor, n_bins: int, sigma: float) -> torch.Tensor:
    """``[..., n_bins]`` target distributions: one-hot at ``tokens``, or a Gaussian of ``sigma`` bins around it."""
    if sigma <= 0:
        return F.one_hot(tokens, n_bins).float()
    bins = torch.arange(n_bins, dtype=torch.float32)
    w = torch.exp(-0.5 * ((bins - tokens[..., None].float()) / sigma) ** 2)
    return w / w.sum(-1, keepdim=True)


def provenance() -> dict:
    """What made the weights: the command line, the git revision (and whether this example's files differed from
    it), and the sha256 of every source file of this example -- taken before training starts."""
    here = Path(__file__).resolve().parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).resolve().parent == here:
        argv[0:1] = ["-m", "examples.robot"]
    return {"command": [Path(sys.executable).name, *argv],
            "git_revision": git("rev-parse", "HEAD"),
            "git_dirty_example": bool(git("status", "--porcelain", "--", str(here))),
            "sources_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                               for p in sorted(here.glob("*.py"))}}


def train(demos: dict[str, np.ndarray], cfg: TrainConfig, model_kw: dict | None = None,
          log=sys.stderr) -> tuple[VLAPolicy, InstructionTokenizer, dict]:
    """Train on ``demos`` (from :func:`sim.collect`); returns the model, its tokenizer, and statistics."""
    torch.manual_seed(cfg.seed)
    tasks = [str(t) for t in demos["tasks"]]
    tokenizer = InstructionTokenizer.from_texts([instruction(t) for t in tasks])
    model = VLAPolicy(VLAConfig(vocab=len(tokenizer), text_len=tokenizer.length, **(model_kw or {})))
    obs = torch.from_numpy(demos["obs"]).float()
    targets = torch.from_numpy(actions_to_tokens(demos["actions"]))
    task_text = torch.tensor([tokenizer.encode(instruction(t)) for t in tasks])
    text = task_text[torch.from_numpy(demos["task"])]
    model.set_normalization(obs_features(obs))
    n = obs.shape[0]

    decay = [p for nm, p in model.named_parameters() if p.dim() >= 2 and "pos" not in nm]
    other = [p for nm, p in model.named_parameters() if not (p.dim() >= 2 and "pos" not in nm)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)))

    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0 = time.perf_counter()
    losses, accs = [], []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        o, y = obs[idx], targets[idx]
        if cfg.obs_noise:
            o = o + cfg.obs_noise * torch.randn(o.shape, generator=gen)
        logits = model(text[idx], o, y)
        loss = -(soft_targets(y, model.cfg.n_bins, cfg.label_sigma) * logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        accs.append((logits.argmax(-1) - y).abs().le(2).float().mean().item())
        if step % 500 == 0 or step == cfg.steps - 1:
            print(f"train step {step}/{cfg.steps}: loss {np.mean(losses[-100:]):.3f}, "
                  f"tokens within 2 bins {np.mean(accs[-100:]):.3f}, {time.perf_counter() - t0:.0f} s",
                  file=log, flush=True)
    model.eval()
    stats = {"train_seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
             "samples": n, "final_loss": float(np.mean(losses[-100:])),
             "final_within2": float(np.mean(accs[-100:])),
             "parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, stats
