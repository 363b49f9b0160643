"""The one evaluator: group facts, have the backend score them, rank the candidates, compute metrics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from probe.backends import Backend, Prompt, PromptInputs
from probe.batching import Batch, make_batches
from probe.data import Fact
from probe.metrics import length_breakdown, ranks_of, relation_metrics
from probe.objects import ObjectCandidates
from probe.templates import CompiledTemplate
from probe.vocab import CandidateVocab


def scored_batches(backend: Backend, prompt: PromptInputs, compiled: CompiledTemplate, facts: list[Fact],
                   candidates: CandidateVocab, batch_size: int) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, candidate scores (B, C)) for facts batched by length."""
    batches = make_batches(compiled, facts, candidates, batch_size, backend.pad_id)
    yield from zip(batches, backend.score(batches, prompt, candidates), strict=True)


@dataclass
class RelationEval:
    """Ranks and top-10 predictions for the facts of one relation; with objects of any length, each gold's token
    count and the metrics by it."""

    facts: list[Fact]
    ranks: list[int]
    top10: list[list[str]]
    metrics: dict = field(default_factory=dict)
    lengths: list[int] | None = None

    @classmethod
    def of(cls, facts: list[Fact], ranks: list[int], top10: list[list[str]], candidates) -> RelationEval:
        """Ranks with their metrics; for objects of any length, the breakdown by the gold's token count too."""
        metrics: dict = relation_metrics(ranks)
        lengths = None
        if isinstance(candidates, ObjectCandidates):
            lengths = [len(candidates.sequences[candidates.index[f.obj]]) for f in facts]
            metrics["by_length"] = length_breakdown(ranks, lengths)
        return cls(list(facts), ranks, top10, metrics, lengths)

    def predictions(self) -> list[dict]:
        rows = [{"sub": f.sub, "obj": f.obj, "rank": r, "top10": t}
                for f, r, t in zip(self.facts, self.ranks, self.top10, strict=True)]
        for row, n in zip(rows, self.lengths or [], strict=False):
            row["n_tokens"] = n
        return rows


def rank_candidates(scores: torch.Tensor, gold: torch.Tensor, candidates: CandidateVocab) -> tuple[list[int], list[list[str]]]:
    """Ranks of the gold candidates and the top-10 words of score rows (B, C)."""
    top = scores.topk(min(10, scores.shape[1]), dim=1).indices.tolist()
    return ranks_of(scores, gold).tolist(), [[candidates.words[i] for i in row] for row in top]


def by_input(compiled: CompiledTemplate, facts: list[Fact]) -> dict[str, list[Fact]]:
    """Facts grouped by their input (with a template: their subject), so that each input runs once."""
    groups: dict[str, list[Fact]] = {}
    for f in facts:
        groups.setdefault(compiled.input_key(f), []).append(f)
    return groups


def inputs_of(prompt: Prompt | None) -> PromptInputs:
    """What a prompt puts into the LM, computed without gradients in eval mode; None: nothing (a fixed template)."""
    if prompt is None:
        return PromptInputs()
    was_training = isinstance(prompt, nn.Module) and prompt.training
    if was_training:
        prompt.eval()
    with torch.no_grad():
        inputs = prompt.prompt_inputs()
    if was_training:
        prompt.train()
    return inputs


@torch.no_grad()
def evaluate_facts(
    backend: Backend,
    method: Prompt | None,
    compiled: CompiledTemplate,
    facts: list[Fact],
    candidates: CandidateVocab,
    batch_size: int = 128,
    progress: tqdm | None = None,
) -> RelationEval:
    """Rank every candidate for each fact and return ranks, top-10 words and P@1/P@10/MRR.

    Each distinct subject is run once; its scores serve every fact with that subject. `method` None: the template
    alone (a manual or discrete prompt, a cloze sentence).
    """
    prompt = inputs_of(method)
    groups = by_input(compiled, facts)
    ranked = _Ranked(compiled, groups, candidates)
    for batch, scores in scored_batches(backend, prompt, compiled, [g[0] for g in groups.values()], candidates, batch_size):
        added = ranked.add(batch, scores)
        if progress is not None:
            progress.update(added)
    return ranked.result()


@torch.no_grad()
def evaluate_pack(backend: Backend, items: list[tuple[Prompt | None, CompiledTemplate, list[Fact], CandidateVocab]],
                  batch_size: int = 128) -> list[RelationEval]:
    """`evaluate_facts` for several (prompt, template, facts, candidates) at once: the backend scores them in one call
    (`Backend.score_pack`), part by part or merged, as it computes fastest."""
    groups = [by_input(compiled, facts) for _, compiled, facts, _ in items]
    batches = [make_batches(compiled, [g[0] for g in grouped.values()], candidates, batch_size, backend.pad_id)
               for (_, compiled, _, candidates), grouped in zip(items, groups, strict=True)]
    parts = [(b, inputs_of(prompt), candidates) for b, (prompt, _, _, candidates) in zip(batches, items, strict=True)]
    out = []
    for (_, compiled, _, candidates), grouped, part, scores in zip(items, groups, batches, backend.score_pack(parts),
                                                                  strict=True):
        ranked = _Ranked(compiled, grouped, candidates)
        for batch, batch_scores in zip(part, scores, strict=True):
            ranked.add(batch, batch_scores)
        out.append(ranked.result())
    return out


class _Ranked:
    """Ranks and top-10 words of a relation's facts, gathered batch by batch (each input's scores serve every fact
    with that input)."""

    def __init__(self, compiled, groups: dict[str, list[Fact]], candidates):
        self.compiled, self.groups, self.candidates = compiled, groups, candidates
        self.ranks: list[int] = []
        self.top10: list[list[str]] = []
        self.ordered: list[Fact] = []

    def add(self, batch: Batch, scores: torch.Tensor) -> int:
        """The facts of a batch's inputs ranked by its scores (B, C); returns how many facts that was."""
        scores = scores.cpu()
        same = [self.groups[self.compiled.input_key(f)] for f in batch.facts]
        rows = torch.tensor([i for i, g in enumerate(same) for _ in g])
        batch_facts = [f for g in same for f in g]
        gold = torch.tensor([self.candidates.index[f.obj] for f in batch_facts])
        batch_ranks, batch_top10 = rank_candidates(scores[rows], gold, self.candidates)
        self.ranks.extend(batch_ranks)
        self.top10.extend(batch_top10)
        self.ordered.extend(batch_facts)
        return len(batch_facts)

    def result(self) -> RelationEval:
        return RelationEval.of(self.ordered, self.ranks, self.top10, self.candidates)


@torch.no_grad()
def evaluate_ensemble(
    backend: Backend,
    method: Prompt | None,
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
    key = prompts[0].input_key  # the same subjects share an input under every template
    groups = by_input(prompts[0], facts)
    row_of = {k: i for i, k in enumerate(groups)}
    total = sum(weights)
    prompt = inputs_of(method)
    dtype = torch.float64 if isinstance(candidates, ObjectCandidates) else torch.float32  # as the scores come
    scores = torch.zeros(len(groups), len(candidates), dtype=dtype)
    for compiled, weight in zip(prompts, weights, strict=True):
        for batch, logits in scored_batches(backend, prompt, compiled, [g[0] for g in groups.values()], candidates,
                                            batch_size):
            rows = torch.tensor([row_of[key(f)] for f in batch.facts])
            scores[rows] += (weight / total) * logits.log_softmax(dim=1).cpu()
            if progress is not None:
                progress.update(sum(len(groups[key(f)]) for f in batch.facts))
    gold = torch.tensor([candidates.index[f.obj] for f in facts])
    ranks, top10 = rank_candidates(scores[[row_of[key(f)] for f in facts]], gold, candidates)
    return RelationEval.of(facts, ranks, top10, candidates)


def evaluate_fixed(scores: torch.Tensor, facts: list[Fact], candidates: CandidateVocab) -> RelationEval:
    """Every fact ranks the candidates by the same scores (C,): a control that does not use the LM (majority)."""
    gold = torch.tensor([candidates.index[f.obj] for f in facts])
    ranks, top10 = rank_candidates(scores.expand(len(facts), -1), gold, candidates)
    return RelationEval.of(facts, ranks, top10, candidates)
