"""Objects of any length (`--objects any`): each relation's answer candidates as token sequences, ranked by
the log-likelihood the LM gives them.

- `ObjectCandidates`: a relation's candidate objects, their tokens, and the contexts they are scored in;
- `Contexts`: what the LM must predict a token from. For a causal LM a context is a prefix of candidate tokens
  (the token trie's inner nodes: candidates that share leading tokens share them); for a masked LM it is the
  object's length and the tokens already filled in left to right (within-word l2r pseudo-log-likelihood);
- `RelationCandidates`: the candidates of each relation, from its objects across splits or a candidates file.

A candidate's score is the sum, over its tokens, of log p(token | context), read off one full-vocabulary
distribution per context (`--length-norm`: divided by its token count). Backends compute the distributions;
this module knows nothing of models beyond their tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from probe.data import FactData, json_record
from probe.errors import DataError
from probe.files import read_text
from probe.templates import encode_words, is_space_sensitive

MASKED_SCORING = "within-word-l2r"  # Kauf & Ivanova (2023): later tokens of the same object stay masked


@dataclass(frozen=True)
class ObjectsSpec:
    """How `--objects any` chooses and scores candidates (small: it travels to Ray workers)."""

    candidates_file: str | None = None  # None: each relation's own objects across its splits
    length_norm: bool = False

    def describe(self) -> dict:
        return {"objects": "any", "candidates": self.candidates_file or "relation objects",
                "length_norm": self.length_norm}


@dataclass
class Contexts:
    """The contexts a model kind scores a candidate set's tokens in.

    keys: one per context; the causal root `()` or masked `(k, ())` (nothing filled in yet) come first per kind.
    edge_context, edge_token: (E,) each distinct (context, next token) pair, scored once for all candidates.
    candidate_edges: (C, longest) the edges of each candidate's tokens, padded with E (a zero score).
    """

    keys: list[tuple]
    edge_context: torch.Tensor
    edge_token: torch.Tensor
    candidate_edges: torch.Tensor

    @cached_property
    def tree(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal contexts after the root, as tokens to run after the prompt: their last tokens (N,), which of
        them each may see (N, N: its ancestors and itself), and their depths (N,), counted from 1."""
        keys = self.keys[1:]
        at = {k: i for i, k in enumerate(keys)}
        tokens = torch.tensor([k[-1] for k in keys], dtype=torch.long)
        sees = torch.zeros(len(keys), len(keys), dtype=torch.bool)
        for i, k in enumerate(keys):
            sees[i, [at[k[:d]] for d in range(1, len(k) + 1)]] = True
        return tokens, sees, torch.tensor([len(k) for k in keys], dtype=torch.long)

    def sum_edges(self, edge_scores: torch.Tensor) -> torch.Tensor:
        """Candidate scores (B, C) from edge scores (B, E): each candidate's edges summed."""
        padded = torch.cat([edge_scores, edge_scores.new_zeros(edge_scores.shape[0], 1)], dim=1)
        return padded[:, self.candidate_edges].sum(dim=2)


@dataclass
class ObjectCandidates:
    """A relation's candidate objects as token sequences (with the leading space the single-token path uses)."""

    words: list[str]
    sequences: list[tuple[int, ...]]
    index: dict[str, int]
    n_source: int
    length_norm: bool = False
    dropped_reason: str = "objects that are not among the relation's candidates"
    _contexts: dict[str, Contexts] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.words)

    def for_relation(self, rid: str) -> ObjectCandidates:
        return self

    @cached_property
    def lengths(self) -> torch.Tensor:
        """(C,) token count of each candidate."""
        return torch.tensor([len(s) for s in self.sequences], dtype=torch.long)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Summed log-likelihoods (B, C), divided by the token counts under --length-norm."""
        return scores / self.lengths.to(scores.device, scores.dtype) if self.length_norm else scores

    def contexts(self, kind: str) -> Contexts:
        """The contexts of these candidates for a 'causal' or 'masked' LM (built once per kind)."""
        if kind not in self._contexts:
            self._contexts[kind] = _contexts(self.sequences, kind)
        return self._contexts[kind]


def _contexts(sequences: list[tuple[int, ...]], kind: str) -> Contexts:
    """The token trie's inner nodes (causal), or (length, filled-in prefix) pairs (masked), and their edges."""
    def key(seq: tuple[int, ...], i: int) -> tuple:
        return seq[:i] if kind == "causal" else (len(seq), seq[:i])

    keys: dict[tuple, int] = {}
    if kind == "causal":
        keys[()] = 0  # the root first: the prompt's own next-token distribution
    edges: dict[tuple[int, int], int] = {}
    rows = []
    for seq in sequences:
        row = []
        for i, token in enumerate(seq):
            ctx = keys.setdefault(key(seq, i), len(keys))
            row.append(edges.setdefault((ctx, token), len(edges)))
        rows.append(row)
    longest = max(len(r) for r in rows)
    padded = torch.tensor([r + [len(edges)] * (longest - len(r)) for r in rows], dtype=torch.long)
    pairs = torch.tensor(list(edges), dtype=torch.long).reshape(-1, 2)
    return Contexts(list(keys), pairs[:, 0].clone(), pairs[:, 1].clone(), padded)


def object_candidates(tokenizer, words: list[str], length_norm: bool = False, where: str = "candidates") -> ObjectCandidates:
    """Candidates from words, each tokenised as the single-token path does (' word' for BPE vocabularies)."""
    space = is_space_sensitive(tokenizer)
    kept, seqs = [], []
    for word in dict.fromkeys(w.strip() for w in words if w.strip()):
        ids = tuple(encode_words(tokenizer, word, True, space))
        if not ids:
            raise DataError(f"{where}: candidate {word!r} tokenises to nothing")
        kept.append(word)
        seqs.append(ids)
    if not kept:
        raise DataError(f"{where}: no candidates")
    return ObjectCandidates(kept, seqs, {w: i for i, w in enumerate(kept)}, len(words), length_norm)


def read_candidates_file(path: str | Path) -> tuple[list[str], dict[str, list[str]]]:
    """A candidates file: one object a line (for every relation), or JSONL records with `relation` and `object`.

    Returns (objects for every relation, objects by relation); an empty, unreadable or malformed file is a ProbeError.
    """
    path = Path(path)
    text = read_text(path, "candidates file", "one object a line, or JSONL with 'relation' and 'object'")
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"candidates file {path} is empty: expected one object a line, or JSONL with 'relation' and "
                        "'object'")
    if not lines[0][1].startswith("{"):
        return [line for _, line in lines], {}
    by_relation: dict[str, list[str]] = {}
    for n, line in lines:
        row = json_record(line, path, n)
        rel, obj = (row.get(k) if isinstance(row, dict) else None for k in ("relation", "object"))
        if not isinstance(rel, str) or not isinstance(obj, str) or not rel.strip() or not obj.strip():
            raise DataError(f"{path}:{n}: expected a JSON object with non-empty string fields 'relation' and 'object'")
        by_relation.setdefault(rel.strip(), []).append(obj.strip())
    return [], by_relation


class RelationCandidates:
    """The `--objects any` candidates of each relation for one tokenizer, built on first use."""

    def __init__(self, tokenizer, data: FactData, spec: ObjectsSpec):
        self.tokenizer = tokenizer
        self.data = data
        self.spec = spec
        self.shared, self.by_relation = read_candidates_file(spec.candidates_file) if spec.candidates_file else ([], {})
        self._built: dict[str, ObjectCandidates] = {}

    def words(self, rid: str) -> list[str]:
        """The relation's candidate objects: from the file (its lines for every relation, or the relation's
        records), else the relation's answer space where the data names one (BEAR), else every distinct object of the
        relation across train, dev and test."""
        if self.spec.candidates_file:
            words = self.by_relation.get(rid, []) + self.shared
            if not words:
                raise DataError(f"candidates file {self.spec.candidates_file} has no candidates for relation {rid}")
            return words
        if self.data.relation(rid).answers:  # the data's own answer space (BEAR)
            return list(self.data.relation(rid).answers)
        splits = ("train", "dev", self.data.test_split)
        return list(dict.fromkeys(f.obj for s in splits for f in self.data.facts(rid, s)))

    def for_relation(self, rid: str) -> ObjectCandidates:
        if rid not in self._built:
            where = f"candidates file {self.spec.candidates_file}" if self.spec.candidates_file else f"relation {rid}"
            self._built[rid] = object_candidates(self.tokenizer, self.words(rid), self.spec.length_norm, where)
        return self._built[rid]


def length_bucket(n: int) -> str:
    """The by-length breakdown's bucket of an object of n tokens: '1', '2' or '3+'."""
    return str(n) if n < 3 else "3+"
