"""Facts -> padded tensors, batched by length so that padding stays small."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe.data import Fact
from probe.templates import CompiledTemplate
from probe.vocab import CandidateVocab


@dataclass
class Batch:
    """Padded inputs of a few facts: ids, attention and virtual-slot masks, target positions, gold candidates."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    virtual_mask: torch.Tensor
    target: torch.Tensor
    gold: torch.Tensor
    facts: list[Fact]

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.virtual_mask.to(device),
            self.target.to(device), self.gold.to(device), self.facts,
        )


def filter_facts(facts: list[Fact], candidates: CandidateVocab) -> tuple[list[Fact], int]:
    """Keep the facts whose object is a candidate; also return how many were dropped."""
    kept = [f for f in facts if f.obj in candidates.index]
    return kept, len(facts) - len(kept)


def collate(compiled: CompiledTemplate, facts: list[Fact], candidates: CandidateVocab, pad_id: int) -> Batch:
    """Encode and right-pad facts into one batch."""
    encoded = [compiled.encode(f.sub) for f in facts]
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(facts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(facts), length), dtype=torch.long)
    virtual = torch.zeros((len(facts), length), dtype=torch.bool)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        virtual[i, e.virtual_positions] = True
    target = torch.tensor([e.target for e in encoded])
    gold = torch.tensor([candidates.index[f.obj] for f in facts])
    return Batch(ids, mask, virtual, target, gold, list(facts))


def make_batches(
    compiled: CompiledTemplate,
    facts: list[Fact],
    candidates: CandidateVocab,
    batch_size: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> list[Batch]:
    """Batches sorted by input length (little padding); with a generator, facts are shuffled instead (training)."""
    if generator is not None:
        order = torch.randperm(len(facts), generator=generator).tolist()
    else:
        lengths = [len(compiled.encode(f.sub).input_ids) for f in facts]
        order = sorted(range(len(facts)), key=lambda i: (lengths[i], i))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate(compiled, [facts[i] for i in chunk], candidates, pad_id) for chunk in chunks]
