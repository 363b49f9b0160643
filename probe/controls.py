"""Controls: what a probe reaches without the LM's knowledge, registered by name as methods are.

- `none`: the LM as it is (no control);
- `random-model` (as in OptiPrompt): the same architecture and tokenizer with every weight re-drawn (seeded), so
  what a prompt reaches there is learned from the training facts, not known by the LM;
- `majority`: no LM at all; every fact of a relation ranks the candidates by how often they are train objects.

A control says what it needs (a prompt and the LM's forward, a seed, the train facts) and how it changes the model
or scores the facts; the commands ask it, never its name. To add one: a `Control` subclass, registered in CONTROLS.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import torch

from probe.data import Fact
from probe.errors import SettingError


class Control:
    """The real LM, as loaded (the base of every control)."""

    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "the LM as it is"
    uses_lm: ClassVar[bool] = True  # scores with the LM's forward (else: only its tokenizer, for the candidates)
    trainable: ClassVar[bool] = True  # `probe train` can fit a prompt under it
    seeded: ClassVar[bool] = False  # --seed draws it
    changes_model: ClassVar[bool] = False  # the workers load the model changed (so the model spec names the control)

    def apply(self, model, seed: int = 0) -> None:
        """Change a freshly loaded model as the control asks (the real LM: nothing)."""

    def scores(self, train: list[Fact], candidates) -> torch.Tensor:
        """(C,) scores of the candidates that every fact of a relation gets, for a control that does not use the LM."""
        raise NotImplementedError


class RandomModel(Control):
    """Matrices ~ N(0, initializer_range), biases 0, norm weights 1; tied weights are drawn once."""

    name = "random-model"
    summary = "the same LM with every weight re-drawn (seeded by --seed)"
    seeded = True
    changes_model = True

    def apply(self, model, seed: int = 0) -> None:
        randomize_weights(model, seed)


class Majority(Control):
    """The most frequent train objects first, whatever the input."""

    name = "majority"
    summary = "ranks the candidates by their count as train objects, without the LM"
    uses_lm = False
    trainable = False

    def scores(self, train: list[Fact], candidates) -> torch.Tensor:
        return majority_scores(train, candidates)


CONTROLS: dict[str, Control] = {c.name: c() for c in (Control, RandomModel, Majority)}


def get_control(name: str | None) -> Control:
    """The control of a name (None: the real LM); an unknown name is a ProbeError listing the known ones."""
    name = name or "none"
    if name not in CONTROLS:
        raise SettingError(f"unknown control {name!r}: expected one of {', '.join(CONTROLS)}")
    return CONTROLS[name]


def model_controls() -> list[str]:
    """The controls a model is loaded under (those that use the LM)."""
    return [name for name, c in CONTROLS.items() if c.uses_lm]


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


def majority_scores(train: list[Fact], candidates) -> torch.Tensor:
    """(C,) scores: train objects by descending count, the first seen first on ties; every other candidate 0,
    so a gold object never seen in train ranks first among those."""
    counts = Counter(f.obj for f in train if f.obj in candidates.index)  # Counter keeps first-seen order
    ranked = sorted(counts, key=lambda obj: -counts[obj])  # stable sort
    out = torch.zeros(len(candidates))
    for place, obj in enumerate(ranked):
        out[candidates.index[obj]] = len(ranked) - place
    return out
