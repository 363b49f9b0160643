"""Candidates: the words of a LAMA vocab that are a single token for a model's tokenizer, or (`--objects any`,
probe/objects.py) each relation's objects of any length; `CandidateChoice` says which."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe.objects import ObjectsSpec, RelationCandidates
from probe.templates import is_space_sensitive


@dataclass
class CandidateVocab:
    """Candidate words, their token ids (with a leading space for BPE/SentencePiece), and word -> index."""

    words: list[str]
    token_ids: torch.Tensor
    index: dict[str, int]
    n_source: int
    dropped_reason: str = "objects that are not single tokens of the candidate vocabulary"

    def __len__(self) -> int:
        return len(self.words)

    def for_relation(self, rid: str) -> CandidateVocab:
        """The candidates of a relation: the same words for every relation."""
        return self


def build_candidates(tokenizer, words: list[str]) -> CandidateVocab:
    """Keep the words that are one token (' word' for space-sensitive vocabularies, 'word' for WordPiece)."""
    space = is_space_sensitive(tokenizer)
    kept, ids, seen = [], [], set()
    for word in words:
        tok = tokenizer.encode((" " if space else "") + word, add_special_tokens=False)
        if len(tok) == 1 and tok[0] not in seen and tok[0] not in tokenizer.all_special_ids:
            seen.add(tok[0])
            kept.append(word)
            ids.append(tok[0])
    return CandidateVocab(kept, torch.tensor(ids, dtype=torch.long), {w: i for i, w in enumerate(kept)}, len(words))


@dataclass(frozen=True)
class CandidateChoice:
    """What each relation's facts are ranked against: the single tokens of a vocabulary, or with `objects` each
    relation's objects of any length. Small, so that it travels to workers, which build it for their tokenizer."""

    vocab: str = "common"
    objects: ObjectsSpec | None = None

    @classmethod
    def of(cls, choice: CandidateChoice | str) -> CandidateChoice:
        return choice if isinstance(choice, CandidateChoice) else cls(choice)

    def build(self, tokenizer, data) -> CandidateVocab | RelationCandidates:
        """The candidates for a tokenizer: `for_relation(rid)` gives a relation's."""
        if self.objects is not None:
            return RelationCandidates(tokenizer, data, self.objects)
        return build_candidates(tokenizer, data.vocab_words(self.vocab))
