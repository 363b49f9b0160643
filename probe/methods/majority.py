"""The majority-class control: no LM, no input; every fact of a relation gets the same ranking of candidates."""

from __future__ import annotations

from collections import Counter

import torch

from probe.data import Fact
from probe.methods.base import PromptMethod
from probe.vocab import CandidateVocab


class MajorityClass(PromptMethod):
    """Ranks the candidates by how often they are the object of the relation's train facts.

    Ties between train objects of equal count go to the one seen first in the train file; candidates
    never seen in train all share the last place (a gold object among them ranks first of them).
    """

    name = "majority"

    def __init__(self, n_virtual: int = 0, hidden_size: int = 0, config=None):
        super().__init__(0, hidden_size, config)

    @staticmethod
    def scores(train: list[Fact], candidates: CandidateVocab) -> torch.Tensor:
        """(C,) scores: train objects by descending count (first seen first on ties), everything else 0."""
        counts = Counter(f.obj for f in train if f.obj in candidates.index)  # Counter keeps first-seen order
        ranked = sorted(counts, key=lambda obj: -counts[obj])  # stable sort
        out = torch.zeros(len(candidates))
        for place, obj in enumerate(ranked):
            out[candidates.index[obj]] = len(ranked) - place
        return out
