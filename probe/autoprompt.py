"""AutoPrompt's trigger search (Shin et al. 2020): gradient-guided token flips in the virtual slots.

Each iteration takes one train batch and one trigger slot (the slots in turn):
1. the gradient of the loss w.r.t. the trigger embeddings (the LM stays frozen);
2. the top-k allowed vocabulary tokens by -(embedding . gradient), the first-order loss decrease;
3. each of them re-scored on the batch; the best replaces the slot's token if it lowers the loss;
4. after a flip, dev P@1 is evaluated; the best-on-dev triggers are kept, with early stopping.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from probe.backends import LMBackend
from probe.batching import Batch, make_batches
from probe.data import Fact
from probe.evaluate import candidate_scores, evaluate_facts, pad_id
from probe.methods.autoprompt import AutoPrompt
from probe.methods.base import FixedPrompt, PromptMethod
from probe.runs import JsonlLog
from probe.templates import CompiledTemplate, encode_words
from probe.train import TrainResult
from probe.vocab import CandidateVocab


@dataclass
class AutoPromptConfig:
    """Search settings; the defaults fit a CPU budget (about a minute per relation for SmolLM2-135M)."""

    iterations: int = 30
    top_k: int = 10  # candidate tokens re-scored per iteration
    batch_size: int = 16
    patience: int = 10  # iterations without a dev gain before stopping (0: never stop early)
    capitals: bool = True  # allow capitalised tokens as triggers
    seed: int = 13


def allowed_tokens(tokenizer, n_rows: int, train_facts: list[Fact], capitals: bool = True) -> torch.Tensor:
    """Bool mask over the embedding rows a trigger may take: no special or added tokens, no train gold
    object (with or without a leading space), no capitalised token unless `capitals`. Sub-words are allowed."""
    allowed = torch.zeros(n_rows, dtype=torch.bool)
    allowed[: min(n_rows, len(tokenizer))] = True
    banned = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for obj in {f.obj for f in train_facts}:
        for lead in (False, True):
            ids = encode_words(tokenizer, obj, lead, True)
            if len(ids) == 1:
                banned.add(ids[0])
    allowed[[i for i in banned if i < n_rows]] = False
    if not capitals:
        tokens = tokenizer.convert_ids_to_tokens(list(range(min(n_rows, len(tokenizer)))))
        caps = [i for i, t in enumerate(tokens) if t and t.lstrip("Ġ▁#")[:1].isupper()]
        allowed[caps] = False
    return allowed


def batch_loss(backend: LMBackend, method: PromptMethod, batch: Batch, candidates: CandidateVocab) -> torch.Tensor:
    """Cross-entropy of the gold candidate at the target, as the gradient trainer computes it."""
    return F.cross_entropy(candidate_scores(backend, method, batch, candidates).float(), batch.gold)


def trigger_gradient(backend: LMBackend, method: PromptMethod, batch: Batch,
                     candidates: CandidateVocab) -> tuple[float, torch.Tensor]:
    """The batch loss and its gradient w.r.t. the (n_virtual, H) trigger embeddings."""
    leaf = FixedPrompt(method.virtual_embeddings().detach())
    leaf.embeddings.requires_grad_(True)
    loss = batch_loss(backend, leaf, batch, candidates)
    loss.backward()
    return loss.item(), leaf.embeddings.grad


def flip_candidates(table: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, current: int, k: int) -> list[int]:
    """The k allowed tokens (not `current`) with the largest first-order loss decrease, -(e . g)."""
    scores = -(table @ grad.to(table.dtype)).float()
    scores[~allowed] = -torch.inf
    scores[current] = -torch.inf
    k = min(k, int(torch.isfinite(scores).sum()))
    return scores.topk(k).indices.tolist()


@torch.no_grad()
def flip_losses(backend: LMBackend, method: AutoPrompt, batch: Batch, candidates: CandidateVocab, slot: int,
                tokens: list[int], max_rows: int = 256) -> list[float]:
    """The batch loss with `slot` set to each of `tokens`, several trials per forward pass."""
    per_pass = max(1, max_rows // len(batch.facts))
    losses: list[float] = []
    for start in range(0, len(tokens), per_pass):
        chunk = torch.tensor(tokens[start : start + per_pass], device=method.trigger_ids.device)
        trials = method.trigger_ids.repeat(len(chunk), 1)  # (k, n_virtual)
        trials[:, slot] = chunk
        virtual = backend.embed(trials).repeat_interleave(len(batch.facts), dim=0)  # (k * B, n_virtual, H)
        big = batch.repeat(len(chunk))
        scores = candidate_scores(backend, method, big, candidates, virtual).float()
        loss = F.cross_entropy(scores, big.gold, reduction="none").view(len(chunk), -1).mean(dim=1)
        losses.extend(loss.tolist())
    return losses


def _batches(compiled: CompiledTemplate, facts: list[Fact], candidates: CandidateVocab, batch_size: int,
             pad: int, generator: torch.Generator) -> Iterator[Batch]:
    """Shuffled train batches, epoch after epoch."""
    while True:
        yield from make_batches(compiled, facts, candidates, batch_size, pad, generator)


def search_triggers(
    backend: LMBackend,
    method: AutoPrompt,
    compiled: CompiledTemplate,
    train_facts: list[Fact],
    dev_facts: list[Fact],
    candidates: CandidateVocab,
    config: AutoPromptConfig,
    log_path: Path | None = None,
    desc: str = "search",
) -> TrainResult:
    """Search trigger tokens on train facts with early stopping on dev P@1; leaves the best-on-dev triggers in `method`."""
    generator = torch.Generator().manual_seed(config.seed)
    table = backend.model.get_input_embeddings().weight.detach()
    allowed = allowed_tokens(backend.tokenizer, table.shape[0], train_facts, config.capitals).to(table.device)
    stream = _batches(compiled, train_facts, candidates, config.batch_size, pad_id(backend), generator)
    ids = method.trigger_ids
    best = evaluate_facts(backend, method, compiled, dev_facts, candidates).metrics
    best_ids, best_step, bad, step, stopped = ids.clone(), 0, 0, 0, False
    log = JsonlLog(log_path)
    log.write({"step": 0, "dev_p1": best["p1"], "dev_mrr": best["mrr"], "triggers": ids.tolist(), "config": asdict(config)})
    bar = tqdm(total=config.iterations, desc=desc, unit="it", dynamic_ncols=True, leave=False)
    try:
        for step in range(1, config.iterations + 1):
            batch = next(stream).to(backend.device)
            slot = (step - 1) % method.n_virtual
            loss, grad = trigger_gradient(backend, method, batch, candidates)
            current = int(ids[slot])
            best_loss, best_token = loss, current
            tokens = flip_candidates(table, grad[slot], allowed, current, config.top_k)
            for token, trial in zip(tokens, flip_losses(backend, method, batch, candidates, slot, tokens), strict=True):
                if trial < best_loss:
                    best_loss, best_token = trial, token
            ids[slot] = best_token
            entry = {"step": step, "slot": slot, "loss": round(loss, 5), "new_loss": round(best_loss, 5),
                     "token": best_token, "flipped": best_token != current}
            bad += 1
            if best_token != current:
                dev = evaluate_facts(backend, method, compiled, dev_facts, candidates).metrics
                entry.update(dev_p1=dev["p1"], dev_mrr=dev["mrr"])
                if (dev["p1"], dev["mrr"]) > (best["p1"], best["mrr"]):
                    best, best_ids, best_step, bad = dev, ids.clone(), step, 0
            log.write(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{best_loss:.3f}", best=f"{best['p1']:.1f}")
            if config.patience and bad >= config.patience:
                stopped = True
                break
    finally:
        bar.close()
        log.close()
    ids.copy_(best_ids)
    method.eval()
    return TrainResult(best, best_step, step, stopped)
