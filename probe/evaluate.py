"""The one evaluation loop: any method, any backend, one relation at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm import tqdm

from probe.backends import LMBackend, Prefix
from probe.batching import Batch, make_batches
from probe.data import Fact
from probe.llama_fast import Past
from probe.methods.base import PromptMethod
from probe.methods.majority import MajorityClass
from probe.metrics import ranks_of, relation_metrics
from probe.templates import CompiledTemplate
from probe.vocab import CandidateVocab


def pad_id(backend: LMBackend) -> int:
    tok = backend.tokenizer
    return next((t for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) if t is not None), 0)


def input_embeddings(backend: LMBackend, method: PromptMethod, batch: Batch, virtual: torch.Tensor | None = None) -> torch.Tensor:
    """Input embeddings (B, L, H) of a batch: the LM's, with the method's (or `virtual`'s) at the virtual slots."""
    embeds = backend.embed(batch.input_ids)
    if virtual is None:
        virtual = method.virtual_embeddings()
    if virtual is not None:
        rows = virtual.reshape(-1, virtual.shape[-1]) if virtual.dim() == 3 else virtual.repeat(batch.input_ids.shape[0], 1)
        embeds = embeds.masked_scatter(batch.virtual_mask[..., None], rows.to(embeds.dtype))
    return embeds


class SharedStart(NamedTuple):
    """Keys and values of the starts of some batches' inputs, each distinct start run once.

    `past` is the start that every input has (its first `common` tokens, say "The capital of"), followed,
    where inputs share them often enough, by the next few tokens (say a subject's first): then `past` has one
    row per distinct start, and `row_start[i]` is the one the i-th input of the batches (in order) continues.
    """

    past: Past
    common: int
    row_start: torch.Tensor | None  # None: `past` is one start for every input

    def for_rows(self, first: int, count: int) -> Past:
        """The starts of inputs first .. first + count - 1 of the batches."""
        if self.row_start is None:
            return self.past
        return self.past.select(self.row_start[first : first + count])


def _distinct_tokens_after(ids: torch.Tensor, virtual: torch.Tensor) -> int:
    """How many leading tokens of `ids` (rows, L) to run once per distinct run of them: the count (real tokens
    only, `virtual` marks the others) that saves the most token positions, 0 if none saves any."""
    best, saved = 0, 0
    for k in range(1, ids.shape[1] + 1):
        if virtual[:, :k].any():
            break
        distinct = len(ids[:, :k].unique(dim=0))
        if k * (len(ids) - distinct) > saved:
            best, saved = k, k * (len(ids) - distinct)
    return best


def shared_start(backend: LMBackend, method: PromptMethod, batches: list[Batch]) -> SharedStart | None:
    """The starts of the inputs of `batches`, each distinct one run once (see `SharedStart`); None if no
    input shares its start with another, or the backend cannot share starts.

    Only for a causal model whose backend `shares_prefixes`, and a method with the same embeddings in every row
    and no prefix-tuning keys and values. Every input keeps at least its target position to run.
    """
    if not batches or not backend.shares_prefixes or method.prefix() is not None:
        return None
    longest = min(int(b.target.min()) for b in batches)
    ids = torch.cat([b.input_ids[:, :longest] for b in batches])  # every input's tokens before the first target
    virtual = torch.cat([b.virtual_mask[:, :longest] for b in batches])
    differ = ((ids != ids[0]) | (virtual != virtual[0])).any(dim=0).nonzero()
    n = int(differ[0]) if len(differ) else longest
    past = None
    if n:
        embeds = input_embeddings(backend, method, batches[0].to(backend.device))
        past = backend.prefix_kv(embeds[:1, :n])
    k = _distinct_tokens_after(ids[:, n:], virtual[:, n:])
    if not k:
        return SharedStart(past, n, None) if past is not None else None
    starts, row_start = ids[:, n : n + k].unique(dim=0, return_inverse=True)
    if n == 0 and k == 1:  # the inputs' first tokens: the backend keeps them across relations
        past = backend.first_token_kv(starts[:, 0])
    else:
        past = backend.prefix_kv(backend.embed(starts.to(backend.device)), past)
    return SharedStart(past, n, row_start.to(backend.device))


def candidate_scores(backend: LMBackend, method: PromptMethod, batch: Batch, candidates: CandidateVocab,
                     virtual: torch.Tensor | None = None, shared: Past | None = None) -> torch.Tensor:
    """Scores (B, C) of every candidate at each fact's target position. Shared by evaluator and trainer.

    The virtual slots get the method's embeddings, or `virtual` (B, n_virtual, H): one set per row.
    A prefix method instead sets the keys and values of the virtual slots at every layer.
    With `shared` (starts from `shared_start`, one for all rows or one per row), those are not run again.
    """
    embeds = input_embeddings(backend, method, batch, virtual)
    if shared is not None:
        n = shared.length
        hidden = backend.target_hidden(embeds[:, n:], batch.attention_mask[:, n:], batch.target - n, past=shared)
    else:
        kv = method.prefix()
        prefix = Prefix(kv[0], kv[1], batch.virtual_mask) if kv is not None else None
        hidden = backend.target_hidden(embeds, batch.attention_mask, batch.target, prefix)
    return backend.candidate_logits(hidden, candidates.token_ids)


def scored_batches(backend: LMBackend, method: PromptMethod, compiled: CompiledTemplate, facts: list[Fact],
                   candidates: CandidateVocab, batch_size: int) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, candidate scores) for facts batched by length; each distinct shared start runs once."""
    batches = make_batches(compiled, facts, candidates, batch_size, pad_id(backend))
    start = shared_start(backend, method, batches)
    done = 0
    for batch in batches:
        shared = start.for_rows(done, len(batch.facts)) if start is not None else None
        done += len(batch.facts)
        yield batch, candidate_scores(backend, method, batch.to(backend.device), candidates, shared=shared)


@dataclass
class RelationEval:
    """Ranks and top-10 predictions for the facts of one relation."""

    facts: list[Fact]
    ranks: list[int]
    top10: list[list[str]]
    metrics: dict[str, float] = field(default_factory=dict)

    def predictions(self) -> list[dict]:
        return [
            {"sub": f.sub, "obj": f.obj, "rank": r, "top10": t}
            for f, r, t in zip(self.facts, self.ranks, self.top10, strict=True)
        ]


def rank_candidates(scores: torch.Tensor, gold: torch.Tensor, candidates: CandidateVocab) -> tuple[list[int], list[list[str]]]:
    """Ranks of the gold candidates and the top-10 words of score rows (B, C)."""
    top = scores.topk(min(10, scores.shape[1]), dim=1).indices.tolist()
    return ranks_of(scores, gold).tolist(), [[candidates.words[i] for i in row] for row in top]


def by_subject(facts: list[Fact]) -> dict[str, list[Fact]]:
    """Facts grouped by subject: with one template, facts of the same subject share one input."""
    groups: dict[str, list[Fact]] = {}
    for f in facts:
        groups.setdefault(f.sub, []).append(f)
    return groups


@torch.no_grad()
def evaluate_facts(
    backend: LMBackend,
    method: PromptMethod,
    compiled: CompiledTemplate,
    facts: list[Fact],
    candidates: CandidateVocab,
    batch_size: int = 128,
    progress: tqdm | None = None,
) -> RelationEval:
    """Rank every candidate for each fact and return ranks, top-10 words and P@1/P@10/MRR.

    Each distinct subject is run once; its scores serve every fact with that subject. Where the backend can,
    a start that inputs share (a template's words or virtual tokens before [X], a subject's first token) is
    run once.
    """
    was_training = method.training
    method.eval()
    groups = by_subject(facts)
    ranks: list[int] = []
    top10: list[list[str]] = []
    ordered: list[Fact] = []
    for batch, scores in scored_batches(backend, method, compiled, [g[0] for g in groups.values()], candidates, batch_size):
        scores = scores.cpu()
        same = [groups[f.sub] for f in batch.facts]
        rows = torch.tensor([i for i, g in enumerate(same) for _ in g])
        batch_facts = [f for g in same for f in g]
        gold = torch.tensor([candidates.index[f.obj] for f in batch_facts])
        batch_ranks, batch_top10 = rank_candidates(scores[rows], gold, candidates)
        ranks.extend(batch_ranks)
        top10.extend(batch_top10)
        ordered.extend(batch_facts)
        if progress is not None:
            progress.update(len(batch_facts))
    method.train(was_training)
    return RelationEval(ordered, ranks, top10, relation_metrics(ranks))


@torch.no_grad()
def evaluate_ensemble(
    backend: LMBackend,
    method: PromptMethod,
    prompts: list[CompiledTemplate],
    weights: list[float],
    facts: list[Fact],
    candidates: CandidateVocab,
    batch_size: int = 128,
    progress: tqdm | None = None,
) -> RelationEval:
    """Rank candidates by the weighted mean over prompts of their log-softmax among the candidates (LPAQA)."""
    if len(prompts) == 1:
        return evaluate_facts(backend, method, prompts[0], facts, candidates, batch_size, progress)
    groups = by_subject(facts)
    row_of = {sub: i for i, sub in enumerate(groups)}
    was_training = method.training
    method.eval()
    total = sum(weights)
    scores = torch.zeros(len(groups), len(candidates))
    for compiled, weight in zip(prompts, weights, strict=True):
        for batch, logits in scored_batches(backend, method, compiled, [g[0] for g in groups.values()], candidates,
                                            batch_size):
            rows = torch.tensor([row_of[f.sub] for f in batch.facts])
            scores[rows] += (weight / total) * logits.log_softmax(dim=1).cpu()
            if progress is not None:
                progress.update(sum(len(groups[f.sub]) for f in batch.facts))
    method.train(was_training)
    gold = torch.tensor([candidates.index[f.obj] for f in facts])
    ranks, top10 = rank_candidates(scores[[row_of[f.sub] for f in facts]], gold, candidates)
    return RelationEval(list(facts), ranks, top10, relation_metrics(ranks))


def evaluate_majority(train: list[Fact], facts: list[Fact], candidates: CandidateVocab) -> RelationEval:
    """The majority-class control: every fact ranks the candidates by their count as train objects."""
    scores = MajorityClass.scores(train, candidates).expand(len(facts), -1)
    gold = torch.tensor([candidates.index[f.obj] for f in facts])
    ranks, top10 = rank_candidates(scores, gold, candidates)
    return RelationEval(list(facts), ranks, top10, relation_metrics(ranks))
