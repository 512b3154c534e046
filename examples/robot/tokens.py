"""Tokens of the VLA-shaped policy: task instructions (a word-level tokenizer) and discretized actions.

OpenVLA maps each continuous action dimension to one of 256 uniform bins and
decodes the bins as tokens. Here an action in ``[-1, 1]^4`` (Meta-World's
end-effector delta xyz + gripper) becomes 4 tokens in ``[0, 256)``; the
inverse maps a token to its bin's centre, so a round trip moves a value by at
most half a bin (``1 / 256``).

Nothing here needs Meta-World.
"""
from __future__ import annotations

import re

import numpy as np
import torch

N_BINS = 256
ACTION_DIM = 4
ACTION_LOW, ACTION_HIGH = -1.0, 1.0

# Instructions for the tasks a user is likely to try; any other v3 task gets one derived from its name.
INSTRUCTIONS = {
    "reach-v3": "reach the goal position with the gripper",
    "reach-wall-v3": "reach the goal position behind the wall",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "push the puck back to the goal",
    "pick-place-v3": "pick the puck and place it at the goal",
    "pick-place-wall-v3": "pick the puck over the wall and place it at the goal",
    "button-press-v3": "press the button from the front",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-wall-v3": "press the button behind the wall",
    "door-open-v3": "open the door by its handle",
    "door-close-v3": "close the door",
    "drawer-open-v3": "open the drawer by its handle",
    "drawer-close-v3": "close the drawer",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "plate-slide-v3": "slide the plate into the goal",
    "handle-press-v3": "press the handle down",
    "faucet-open-v3": "turn the faucet open",
    "faucet-close-v3": "turn the faucet closed",
    "coffee-button-v3": "press the button on the coffee machine",
    "dial-turn-v3": "turn the dial",
    "sweep-into-v3": "sweep the puck into the hole",
}


def instruction(task: str) -> str:
    """The instruction text of a Meta-World task name (``pick-place-v3``)."""
    if task in INSTRUCTIONS:
        return INSTRUCTIONS[task]
    words = re.sub(r"-v\d+$", "", task).replace("-", " ")
    return f"do the task {words}"


class InstructionTokenizer:
    """Word-level tokenizer over a fixed vocabulary, padded / cut to ``length`` tokens.

    Ids: 0 = ``<pad>``, 1 = ``<unk>``, then the words in the order given.
    Unknown words become ``<unk>``, so a policy trained on some tasks still
    tokenizes any instruction.
    """

    PAD, UNK = 0, 1
    SPECIALS = ("<pad>", "<unk>")

    def __init__(self, words: list[str], length: int = 12):
        self.words = list(words)
        self.length = length
        self.vocab = {w: i for i, w in enumerate(self.SPECIALS + tuple(self.words))}

    @classmethod
    def from_texts(cls, texts: list[str], length: int = 12) -> InstructionTokenizer:
        seen: dict[str, None] = {}
        for t in texts:
            for w in cls.split(t):
                seen.setdefault(w, None)
        return cls(sorted(seen), length)

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab.get(w, self.UNK) for w in self.split(text)][: self.length]
        return ids + [self.PAD] * (self.length - len(ids))

    def decode(self, ids) -> str:
        inverse = {i: w for w, i in self.vocab.items()}
        return " ".join(inverse[int(i)] for i in ids if int(i) != self.PAD)

    def tensor(self, text: str) -> torch.Tensor:
        """``[1, length]`` int64 ids."""
        return torch.tensor([self.encode(text)], dtype=torch.long)

    def to_json(self) -> dict:
        return {"words": self.words, "length": self.length}

    @classmethod
    def from_json(cls, d: dict) -> InstructionTokenizer:
        return cls(d["words"], d["length"])


def actions_to_tokens(actions) -> np.ndarray:
    """Continuous actions ``[..., 4]`` (clipped to [-1, 1]) to bin tokens in ``[0, 256)``."""
    a = np.clip(np.asarray(actions, dtype=np.float64), ACTION_LOW, ACTION_HIGH)
    scaled = (a - ACTION_LOW) / (ACTION_HIGH - ACTION_LOW) * N_BINS
    return np.minimum(np.floor(scaled), N_BINS - 1).astype(np.int64)


def tokens_to_actions(tokens) -> np.ndarray:
    """Bin tokens to the centres of their bins (float32)."""
    t = np.asarray(tokens, dtype=np.float64)
    return (ACTION_LOW + (t + 0.5) * (ACTION_HIGH - ACTION_LOW) / N_BINS).astype(np.float32)
