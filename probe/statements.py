"""Statement scoring (`--score statement`, BEAR / LM Pub Quiz): each answer ranked by the log-likelihood the LM gives
the whole template filled with the subject and the answer.

A statement is written and tokenised as LM Pub Quiz writes it (its first letter capitalised; a causal LM's BOS token
first; special tokens and padding not scored), so that the scores are the same numbers:
- causal LMs, teacher-forced: log p(token | the tokens before it), summed over every token but the first. The
  statements of one subject share their leading tokens: those run once as a prompt (`Batch`), and what follows
  (the answer and the template's words after it) forms a token trie after it (probe/objects.py `Contexts`, the same
  trie and tree attention `--objects any` uses), so every answer's tail continues from the prompt's keys and values
  and shared nodes run once. Subjects whose tails are the same share one trie and run as rows of one batch. Where
  [Y] comes before [X], the roles swap: each answer with the words up to the subject is a prompt, and the subjects'
  tails (the subject and the words after it) the trie;
- masked LMs: the within-word left-to-right pseudo-log-likelihood of every token of the statement, each read with
  itself and the rest of its word (the tokenizer's word ids) masked.
`mean` divides by the number of tokens scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe.backends import Backend, PromptInputs
from probe.batching import Batch
from probe.data import Fact
from probe.errors import ModelError, SettingError, TemplateError
from probe.objects import ObjectCandidates

REDUCTIONS = ("sum", "mean")


def check_reduction(reduction: str, name: str = "reduction") -> None:
    """A reduction LM Pub Quiz knows (`name`: how the user gave it, a keyword or --reduction)."""
    if reduction not in REDUCTIONS:
        raise SettingError(f"{name} {reduction!r}: expected sum (LM Pub Quiz's default) or mean")
MASKED_STATEMENT_ROWS = 512  # masked copies of statements run at once


def fill(template: str, subject: str, answer: str) -> str:
    """The statement: [X] and [Y] replaced, its first character upper-cased (LM Pub Quiz's `capitalize`)."""
    text = template.replace("[X]", subject).replace("[Y]", answer)
    return text[:1].upper() + text[1:]


@dataclass
class Encoded:
    """One statement's tokens (padding removed), which of them are scored, and their word ids (masked LMs)."""

    ids: tuple[int, ...]
    scored: tuple[int, ...]
    words: tuple[int | None, ...] = ()


def encode(tokenizer, kind: str, texts: list[str]) -> list[Encoded]:
    """Statements tokenised together, as LM Pub Quiz does: causal LMs with the BOS token first (added as text when
    the tokenizer adds none), every non-special token scored but the first; masked LMs with their special tokens,
    every non-special token scored."""
    def run(batch: list[str]):
        return tokenizer(batch, padding=False, add_special_tokens=True, return_special_tokens_mask=True,
                         return_attention_mask=True)  # unpadded: a tokenizer without a pad token works too

    special_first = False
    if kind == "causal":
        if tokenizer.bos_token is None:
            raise ModelError("--score statement: the tokenizer of this causal LM has no BOS token to start statements")
        had = hasattr(tokenizer, "add_bos_token")
        saved = getattr(tokenizer, "add_bos_token", None)
        try:
            tokenizer.add_bos_token = True
            enc = run(texts)
        finally:
            if had:
                tokenizer.add_bos_token = saved
            else:
                del tokenizer.add_bos_token
        if enc["input_ids"][0][0] != tokenizer.bos_token_id:
            enc = run([tokenizer.bos_token + t for t in texts])
            special_first = True
    else:
        enc = run(texts)
    out = []
    for i in range(len(texts)):
        n = sum(enc["attention_mask"][i])
        ids = tuple(enc["input_ids"][i][:n])
        special = list(enc["special_tokens_mask"][i][:n])
        if special_first:
            special[0] = 1
        start = 1 if kind == "causal" else 0
        scored = tuple(j for j in range(start, n) if not special[j])
        words = tuple(enc.word_ids(i)[:n]) if kind == "masked" else ()
        out.append(Encoded(ids, scored, words))
    return out


def statement_scores(backend: Backend, template: str, subjects: list[str], answers: list[str],
                     reduction: str = "sum", batch_size: int = 64) -> torch.Tensor:
    """Log-likelihoods (S, A), float64, of every answer's statement for each subject, reduced by `sum` or `mean`."""
    encoded = [encode(backend.tokenizer, backend.kind, [fill(template, s, a) for a in answers]) for s in subjects]
    if backend.kind == "causal" and template.find("[Y]") < template.find("[X]"):
        # the answer comes first: each answer's statements share it and the words up to the subject, so the
        # answers are the prompts and the subjects' tails the trie
        sums = _causal(backend, [list(col) for col in zip(*encoded, strict=True)], batch_size).T.contiguous()
    elif backend.kind == "causal":
        sums = _causal(backend, encoded, batch_size)
    else:
        sums = _masked(backend, encoded)
    if reduction == "mean":
        counts = torch.tensor([[len(e.scored) for e in row] for row in encoded], dtype=torch.float64)
        return sums / counts
    return sums


def _causal(backend: Backend, encoded: list[list[Encoded]], batch_size: int) -> torch.Tensor:
    """Summed log-likelihoods (R, C) of a matrix of statements: the tokens a row's statements share are its prompt,
    what follows in each a tail; rows whose tails are the same share one trie of them and run as one batch."""
    out = torch.zeros(len(encoded), len(encoded[0]), dtype=torch.float64)
    groups: dict[tuple, list[tuple[int, tuple[int, ...]]]] = {}
    for s, row in enumerate(encoded):
        seqs = []
        for e in row:
            n = e.scored[-1] + 1 if e.scored else 1
            if e.scored != tuple(range(1, n)):
                raise TemplateError("--score statement: a special token inside a statement (only a leading BOS and trailing "
                                    "special tokens are left unscored)")
            seqs.append(e.ids[:n])
        shared = _common_length(seqs)
        groups.setdefault(tuple(q[shared:] for q in seqs), []).append((s, seqs[0][:shared]))
    for tails, members in groups.items():
        candidates = ObjectCandidates([str(i) for i in range(len(tails))], list(tails), {}, len(tails))
        for b0 in range(0, len(members), batch_size):
            part = members[b0:b0 + batch_size]
            rows = [s for s, _ in part]
            batch = _prompt_batch([p for _, p in part], backend.pad_id)
            (tail,) = backend.score_objects([batch], PromptInputs(), candidates)
            out[rows] = tail.double().cpu()
            heads = [(r, p) for r, (_, p) in enumerate(part) if len(p) > 1]
            if heads:
                starts = _prompt_batch([p[:1] for _, p in heads], backend.pad_id)
                lead = backend.gold_loglik(starts.to(backend.device), PromptInputs(), [p[1:] for _, p in heads])
                out[[rows[r] for r, _ in heads]] += lead.double().cpu()[:, None]
    return out


def _common_length(seqs: list[tuple[int, ...]]) -> int:
    """Tokens every sequence begins with, at least one (the BOS) and leaving each at least one token of its own."""
    n, shortest = 1, min(len(q) for q in seqs)
    while n < shortest - 1 and all(q[n] == seqs[0][n] for q in seqs):
        n += 1
    return n


def _prompt_batch(prompts: list[tuple[int, ...]], pad_id: int) -> Batch:
    """Right-padded prompts whose targets are their last tokens (nothing virtual, no gold)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
        mask[i, :len(p)] = 1
    target = torch.tensor([len(p) - 1 for p in prompts])
    return Batch(ids, mask, torch.zeros_like(mask, dtype=torch.bool), target, torch.zeros(len(prompts), dtype=torch.long),
                 [Fact(str(i), "") for i in range(len(prompts))])


def _masked(backend: Backend, encoded: list[list[Encoded]]) -> torch.Tensor:
    """Summed within-word l2r pseudo-log-likelihoods (S, A): one masked copy of a statement per scored token."""
    mask_id = backend.tokenizer.mask_token_id
    copies, owners, reads, tokens = [], [], [], []
    for s, row in enumerate(encoded):
        for a, e in enumerate(row):
            for k, i in enumerate(e.scored):
                ids = list(e.ids)
                ids[i] = mask_id
                if e.words[i] is not None:
                    for j in e.scored[k + 1:]:
                        if e.words[j] != e.words[i]:
                            break
                        ids[j] = mask_id
                copies.append(ids)
                owners.append(s * len(row) + a)
                reads.append(i)
                tokens.append(e.ids[i])
    picked = torch.zeros(len(copies), dtype=torch.float64)
    order = sorted(range(len(copies)), key=lambda c: len(copies[c]))  # similar lengths together: less padding
    for c0 in range(0, len(order), MASKED_STATEMENT_ROWS):
        chunk = order[c0:c0 + MASKED_STATEMENT_ROWS]
        width = max(len(copies[c]) for c in chunk)
        ids = torch.full((len(chunk), width), backend.pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, :len(copies[c])] = torch.tensor(copies[c])
            attention[r, :len(copies[c])] = 1
        ids, attention = ids.to(backend.device), attention.to(backend.device)
        target = torch.tensor([reads[c] for c in chunk], device=backend.device)
        hidden = backend.target_hidden(backend.embed(ids), attention, target)
        logp = backend.vocab_logits(hidden).log_softmax(dim=-1)
        wanted = torch.tensor([tokens[c] for c in chunk], device=logp.device)
        picked[chunk] = logp.gather(1, wanted[:, None])[:, 0].double().cpu()
    sums = torch.zeros(len(encoded) * len(encoded[0]), dtype=torch.float64).index_add(0, torch.tensor(owners), picked)
    return sums.view(len(encoded), len(encoded[0]))


def gold_ranks(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's gold (S,) in scores (S, A) sorted descending, ties in answer order (LM Pub Quiz's
    stable sort: of equal scores the earlier answer ranks first, and P@1 is `gold == first argmax`)."""
    at = scores.gather(1, gold[:, None])
    before = torch.arange(scores.shape[1])[None] < gold[:, None]
    return 1 + (scores > at).sum(dim=1) + ((scores == at) & before).sum(dim=1)
