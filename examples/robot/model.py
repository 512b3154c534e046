"""A small OpenVLA-shaped policy: instruction tokens + observation tokens in, action tokens out, one at a time.

The sequence a forward sees, of fixed length ``text_len + n_obs_tokens + 4``::

    [instruction words (padded)] [observation tokens] [<act>, a0, a1, a2]
                                                          |    |   |   |
                                            logits of:    a0   a1  a2  a3

- instruction words: embeddings of an :class:`~tokens.InstructionTokenizer`'s ids;
- observation tokens: the 39-d Meta-World observation, plus the hand / object
  displacement since the previous frame and the goal and object relative to
  the hand, normalised with statistics stored in the model, cut into groups
  (hand + gripper, object, goal, ...), each group
  projected to one token by its own ``nn.Linear`` -- the stand-in for a VLA's
  vision projector;
- action tokens: 256 bins per action dimension (:mod:`tokens`), decoded
  autoregressively: a causal decoder of pre-LN blocks whose projections are
  plain ``nn.Linear`` (what a quantization pass rewrites), and an action head
  ``nn.Linear(d, 256)``.

``forward(text_ids, obs, action_ids)`` has static shapes and no Python control
flow on values, so ``torch.export`` traces it (and kiln can compile it);
:func:`greedy_decode` is the small driver that runs it 4 times per env step,
re-running the short prefix instead of keeping a KV cache (25 tokens: it is
simple and exactly what a fixed-shape compiled program runs).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import ACTION_DIM, N_BINS, InstructionTokenizer

OBS_DIM = 39
# (start, end) of the model's features: the 39-d observation, then obs[0:7] - obs[18:25] (displacement since the
# previous frame), then goal - hand and object - hand (what reaching / pushing steer by).
OBS_GROUPS = (
    (0, 4),    # hand xyz + gripper opening
    (4, 7),    # object 1 position
    (7, 11),   # object 1 quaternion
    (11, 18),  # object 2 position + quaternion (zeros on most tasks)
    (18, 22),  # previous frame: hand + gripper
    (22, 36),  # previous frame: objects
    (36, 39),  # goal position
    (39, 46),  # hand / gripper / object-1 displacement since the previous frame
    (46, 52),  # goal - hand, object 1 - hand
)
N_FEATURES = 52


def obs_features(obs: torch.Tensor) -> torch.Tensor:
    """``[B, 39]`` observation to the ``[B, 52]`` feature vector the observation tokens read."""
    hand = obs[:, 0:3]
    return torch.cat([obs, obs[:, 0:7] - obs[:, 18:25], obs[:, 36:39] - hand, obs[:, 4:7] - hand], dim=1)


@dataclass
class VLAConfig:
    vocab: int                      # instruction vocabulary size (with <pad>, <unk>)
    text_len: int = 12
    d_model: int = 128
    layers: int = 3
    heads: int = 4
    mlp_ratio: int = 4
    n_bins: int = N_BINS
    action_dim: int = ACTION_DIM
    obs_groups: tuple = field(default_factory=lambda: OBS_GROUPS)

    @property
    def seq_len(self) -> int:
        return self.text_len + len(self.obs_groups) + self.action_dim

    def to_json(self) -> dict:
        d = asdict(self)
        d["obs_groups"] = [list(g) for g in self.obs_groups]
        return d

    @classmethod
    def from_json(cls, d: dict) -> VLAConfig:
        d = dict(d)
        d["obs_groups"] = tuple(tuple(g) for g in d["obs_groups"])
        return cls(**d)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp_ratio * d)
        self.fc2 = nn.Linear(mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class VLAPolicy(nn.Module):
    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.text_embed = nn.Embedding(cfg.vocab, d)
        self.obs_proj = nn.ModuleList(nn.Linear(e - s, d) for s, e in cfg.obs_groups)
        self.action_embed = nn.Embedding(cfg.n_bins + 1, d)   # the last id is <act>, the start of the actions
        self.pos = nn.Parameter(torch.zeros(1, cfg.seq_len, d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.n_bins)
        self.register_buffer("feat_mean", torch.zeros(N_FEATURES))
        self.register_buffer("feat_std", torch.ones(N_FEATURES))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def set_normalization(self, features: torch.Tensor) -> None:
        """Store the mean / std of training features ``[N, 52]`` (std floored: constant features stay finite)."""
        self.feat_mean.copy_(features.mean(0))
        self.feat_std.copy_(features.std(0).clamp_min(1e-2))

    def forward(self, text_ids: torch.Tensor, obs: torch.Tensor, action_ids: torch.Tensor) -> torch.Tensor:
        """``text_ids [B, text_len]`` int64, ``obs [B, 39]`` float, ``action_ids [B, 4]`` int64 (the action
        tokens decoded so far; later slots are ignored) -> next-token logits ``[B, 4, n_bins]``: row ``k``
        predicts action token ``k`` from the prefix and ``action_ids[:, :k]``."""
        f = (obs_features(obs) - self.feat_mean) / self.feat_std
        obs_tokens = torch.stack([p(f[:, s:e]) for p, (s, e) in zip(self.obs_proj, self.cfg.obs_groups)], dim=1)
        start = torch.full_like(action_ids[:, :1], self.cfg.n_bins)
        acts = self.action_embed(torch.cat([start, action_ids[:, :-1]], dim=1))
        x = torch.cat([self.text_embed(text_ids), obs_tokens, acts], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x[:, -self.cfg.action_dim:]))


@torch.no_grad()
def greedy_decode(step, text_ids: torch.Tensor, obs: torch.Tensor, action_dim: int = ACTION_DIM) -> torch.Tensor:
    """Decode ``action_dim`` action tokens greedily; ``step`` is the model (or any callable of its signature,
    e.g. a compiled or quantized one). Returns ``[B, action_dim]`` int64 tokens."""
    ids = torch.zeros(obs.shape[0], action_dim, dtype=torch.long)
    for k in range(action_dim):
        ids[:, k] = step(text_ids, obs, ids)[:, k].argmax(-1)
    return ids


def example_inputs(cfg: VLAConfig, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the traced forward (for ``torch.export`` / ``kiln.compile``)."""
    return (torch.zeros(batch, cfg.text_len, dtype=torch.long), torch.zeros(batch, OBS_DIM),
            torch.zeros(batch, cfg.action_dim, dtype=torch.long))


def save_policy(out_dir: str | Path, model: VLAPolicy, tokenizer: InstructionTokenizer, meta: dict) -> Path:
    """Write ``policy.safetensors`` (weights + normalisation buffers) and ``policy.json`` (config, tokenizer,
    and ``meta``: tasks, the command and source hashes that made it, training statistics)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "policy.safetensors"))
    doc = {"config": model.cfg.to_json(), "tokenizer": tokenizer.to_json(), **meta}
    (out / "policy.json").write_text(json.dumps(doc, indent=2) + "\n")
    return out


def load_policy(out_dir: str | Path) -> tuple[VLAPolicy, InstructionTokenizer, dict]:
    """Read what :func:`save_policy` wrote (no pickle: safetensors + JSON)."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    doc = json.loads((out / "policy.json").read_text())
    model = VLAPolicy(VLAConfig.from_json(doc["config"]))
    model.load_state_dict(load_file(str(out / "policy.safetensors")))
    model.eval()
    return model, InstructionTokenizer.from_json(doc["tokenizer"]), doc
