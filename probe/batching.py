"""Facts -> padded tensors, batched by length so that padding stays small."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe.data import Fact, FactData, Relation
from probe.errors import DataError
from probe.templates import CompiledTemplate, Encoded
from probe.vocab import CandidateVocab

MAX_BATCH_TOKENS = 16384  # positions in an evaluation batch at most (128 rows of LAMA's ~12 tokens are ~1,500)


@dataclass
class Batch:
    """Padded inputs of a few facts: ids, attention and virtual-slot masks, target positions, gold candidates."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    virtual_mask: torch.Tensor
    target: torch.Tensor
    gold: torch.Tensor
    facts: list[Fact]

    @staticmethod
    def cat(batches: list[Batch], pad_id: int) -> Batch:
        """The rows of several batches, in order, right-padded to the longest."""
        width = max(b.input_ids.shape[1] for b in batches)

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return Batch(torch.cat([pad(b.input_ids, pad_id) for b in batches]),
                     torch.cat([pad(b.attention_mask, 0) for b in batches]),
                     torch.cat([pad(b.virtual_mask, False) for b in batches]),
                     torch.cat([b.target for b in batches]), torch.cat([b.gold for b in batches]),
                     [f for b in batches for f in b.facts])

    def repeat(self, n: int) -> Batch:
        """The batch n times over, one copy after the other."""
        return Batch(
            self.input_ids.repeat(n, 1), self.attention_mask.repeat(n, 1), self.virtual_mask.repeat(n, 1),
            self.target.repeat(n), self.gold.repeat(n), self.facts * n,
        )

    def select(self, rows: torch.Tensor | list[int]) -> Batch:
        """These rows of the batch, in this order."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        index = rows.to(self.input_ids.device)
        return Batch(self.input_ids[index], self.attention_mask[index], self.virtual_mask[index], self.target[index],
                     self.gold[index], [self.facts[i] for i in rows.tolist()])

    def splice(self, rows: list[int], fills: list[list[int]], replace: bool, pad_id: int) -> Batch:
        """New rows, the r-th a copy of row `rows[r]` with the tokens `fills[r]` at its target position (replacing the
        token there) or, without `replace`, right after it; text after the target moves along. Targets stay put."""
        ids, virtual = self.input_ids.tolist(), self.virtual_mask.tolist()
        lengths, targets = self.attention_mask.sum(dim=1).tolist(), self.target.tolist()
        new_ids, new_virtual = [], []
        for r, fill in zip(rows, fills, strict=True):
            at, n = targets[r] + (0 if replace else 1), lengths[r]
            skip = at + 1 if replace else at
            new_ids.append(ids[r][:at] + list(fill) + ids[r][skip:n])
            new_virtual.append(virtual[r][:at] + [False] * len(fill) + virtual[r][skip:n])
        width = max(len(x) for x in new_ids)
        out_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        out_virtual = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (x, v) in enumerate(zip(new_ids, new_virtual, strict=True)):
            out_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
            out_virtual[i, : len(v)] = torch.tensor(v, dtype=torch.bool)
        index = torch.tensor(rows, dtype=torch.long)
        device = self.input_ids.device
        return Batch(out_ids.to(device), mask.to(device), out_virtual.to(device), self.target[index.to(self.target.device)],
                     self.gold[index.to(self.gold.device)], [self.facts[i] for i in rows])

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device`; to a GPU from pinned host memory, copied without waiting for the GPU."""
        device = torch.device(device)
        pinned = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if pinned and t.device.type == "cpu":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)

        return Batch(move(self.input_ids), move(self.attention_mask), move(self.virtual_mask), move(self.target),
                     move(self.gold), self.facts)


def filter_facts(facts: list[Fact], candidates) -> tuple[list[Fact], int]:
    """Keep the facts whose object is a candidate; also return how many were dropped."""
    kept = [f for f in facts if f.obj in candidates.index]
    return kept, len(facts) - len(kept)


def relation_facts(data: FactData, relation: Relation, split: str, candidates, strict: bool):
    """Facts of a split whose object is a candidate of the relation, and how many were dropped; with strict, none left
    is a ProbeError."""
    facts, dropped = filter_facts(data.facts(relation.id, split), candidates.for_relation(relation.id))
    if not facts and strict:
        raise DataError(
            f"relation {relation.id} has no {split} facts left after dropping "
            f"{candidates.for_relation(relation.id).dropped_reason} ({dropped} dropped)"
        )
    return facts, dropped


def fit_context(compiled, facts: list[Fact], limit: int | None, candidates=None) -> tuple[list[Fact], list[tuple[Fact, int]]]:
    """The facts whose input fits in `limit` positions (the model's context; None: no limit), and the others with the
    positions they would take. Objects of any length count the longest candidate's tokens too."""
    if not limit:
        return list(facts), []
    extra = 0
    if hasattr(candidates, "sequences"):  # objects of any length: the candidate's tokens follow (or fill) the target
        extra = max(len(s) for s in candidates.sequences) - (1 if compiled.kind == "masked" else 0)
    kept, long = [], []
    for fact in facts:
        n = len(compiled.encode_fact(fact).input_ids) + extra
        if n <= limit:
            kept.append(fact)
        else:
            long.append((fact, n))
    return kept, long


def collate(compiled: CompiledTemplate, facts: list[Fact], candidates: CandidateVocab, pad_id: int,
            encoded: list[Encoded] | None = None) -> Batch:
    """Encode (unless `encoded` is given) and right-pad facts into one batch."""
    if encoded is None:
        encoded = [compiled.encode_fact(f) for f in facts]
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
    max_padding: float = 0.1,
    max_tokens: int = MAX_BATCH_TOKENS,
) -> list[Batch]:
    """Batches of facts sorted by input length, each padded by at most `max_padding` of its tokens and holding at most
    `max_tokens` positions (so that long inputs come in fewer rows, and memory stays bounded).

    With a generator (training), facts are shuffled; each pool of 8 batches is sorted by length before
    it is cut, to pad less, and the batches come out in a shuffled order.
    """
    encoded = [compiled.encode_fact(f) for f in facts]  # once: for the lengths and the batches
    lengths = [len(e.input_ids) for e in encoded]
    if generator is not None:
        order = torch.randperm(len(facts), generator=generator).tolist()
        pool = 8 * batch_size
        chunks = []
        for start in range(0, len(order), pool):
            group = sorted(order[start : start + pool], key=lambda i: lengths[i])
            chunks += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
    else:
        chunks, tokens = [], 0
        for i in sorted(range(len(facts)), key=lambda i: (lengths[i], i)):
            rows = len(chunks[-1]) + 1 if chunks else 0
            if (not chunks or rows > batch_size or lengths[i] * rows > (1 + max_padding) * (tokens + lengths[i])
                    or lengths[i] * rows > max_tokens):
                chunks.append([])
                tokens = 0
            chunks[-1].append(i)
            tokens += lengths[i]
    return [collate(compiled, [facts[i] for i in chunk], candidates, pad_id, [encoded[i] for i in chunk]) for chunk in chunks]
