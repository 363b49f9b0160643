"""Controls: what a probe reaches without the LM's knowledge.

- `random-model` (a model control, as in OptiPrompt): the same architecture and tokenizer with every weight
  re-drawn, so what a prompt reaches there is learned from the training facts, not known by the LM;
- `majority`: no LM at all; every fact of a relation ranks the candidates by how often they are train objects.
"""

from __future__ import annotations

from collections import Counter

import torch

from probe.data import Fact
from probe.vocab import CandidateVocab

MODEL_CONTROLS = ("none", "random-model")
CONTROLS = (*MODEL_CONTROLS, "majority")


def randomize_weights(model, seed: int = 0) -> None:
    """Matrices ~ N(0, initializer_range), biases 0, norm weights 1; tied weights are drawn once."""
    std = getattr(model.config, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def apply_model_control(model, control: str, seed: int = 0) -> None:
    """Change a freshly loaded model as the control asks ('none' leaves it as it is)."""
    if control == "random-model":
        randomize_weights(model, seed)


def majority_scores(train: list[Fact], candidates: CandidateVocab) -> torch.Tensor:
    """(C,) scores: train objects by descending count, the first seen first on ties; every other candidate 0,
    so a gold object never seen in train ranks first among those."""
    counts = Counter(f.obj for f in train if f.obj in candidates.index)  # Counter keeps first-seen order
    ranked = sorted(counts, key=lambda obj: -counts[obj])  # stable sort
    out = torch.zeros(len(candidates))
    for place, obj in enumerate(ranked):
        out[candidates.index[obj]] = len(ranked) - place
    return out
