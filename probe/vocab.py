"""Candidate vocabulary: the words of a LAMA vocab that are a single token for a model's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe.templates import is_space_sensitive


@dataclass
class CandidateVocab:
    """Candidate words, their token ids (with a leading space for BPE/SentencePiece), and word -> index."""

    words: list[str]
    token_ids: torch.Tensor
    index: dict[str, int]
    n_source: int

    def __len__(self) -> int:
        return len(self.words)


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
