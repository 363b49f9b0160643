"""The Llama family (SmolLM2, Llama): a causal LM backend with its own faster forward (llama_forward.py: the same
arithmetic as transformers' Llama, in plain tensors over the model's own weights), and what runs once or together:
- when scoring without gradients, a start that inputs share (a template's leading words or virtual tokens, then
  a subject's first tokens) runs once, and the rows continue its keys and values (`Start`); a first token sees
  no other, so its keys and values are kept across relations;
- in training (gradients on, the same prompt in every row), a batch runs as one sequence: the start its rows
  share once, then each row's tokens up to its target, no padding, with a mask that keeps rows apart; several
  prompts' batches (a pack) run side by side, each as such a sequence;
- objects of any length: the candidates' trie nodes continue each prompt's keys and values, with a tree mask.
`supports(config)` says for which configs this is exactly what transformers computes; others get `CausalLM`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from probe.backends.base import CONTEXT_POSITIONS, PromptInputs, register, weight_stamp
from probe.backends.causal import CausalLM, tree_attention
from probe.backends.llama_forward import LlamaForward, Start
from probe.backends.packed import PackedLinear
from probe.batching import Batch
from probe.objects import ObjectCandidates
from probe.vocab import CandidateVocab

FIRST_TOKENS_MAX = 8192  # first tokens whose keys and values a backend keeps across relations
FIRST_TOKENS_CHUNK = 64  # first tokens run in passes of exactly this many rows (see `first_token_starts`)


def plain_llama(config) -> bool:
    """Whether `LlamaForward` computes exactly what transformers computes for this config."""
    return (
        config.model_type == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
    )


@dataclass
class FirstTokens:
    """Keys and values of inputs' first tokens, one row per token (`row[token]`), valid while `stamp` holds."""

    stamp: tuple
    row: dict[int, int] = field(default_factory=dict)
    start: Start | None = None


class SharedStarts(NamedTuple):
    """The starts of some batches' inputs, each distinct start run once.

    `start` is what every input begins with (its first `common` tokens, say "The capital of"), followed, where
    inputs share them often enough, by the next few tokens (say a subject's first): then `start` has one row
    per distinct start, and `row_start[i]` is the one the i-th input of the batches (in order) continues.
    """

    start: Start
    common: int
    row_start: torch.Tensor | None  # None: `start` is one start for every input

    def for_rows(self, first: int, count: int) -> Start:
        """The starts of inputs first .. first + count - 1 of the batches."""
        if self.row_start is None:
            return self.start
        return self.start.select(self.row_start[first : first + count])


@register
class LlamaCausalLM(CausalLM):
    """A Llama-architecture causal LM through `LlamaForward`; shared starts run once."""

    def __init__(self, model, tokenizer, name: str, device: str = "cpu", control: str = "none"):
        super().__init__(model, tokenizer, name, device, control)
        self.forward = LlamaForward(model)
        self._candidate_linear = PackedLinear()  # the candidate rows, packed on CPU for float32 products
        self._packed_rows: object | None = None  # the CandidateRows packed in _candidate_linear
        self._vocab_linear = PackedLinear()  # every output row, packed (objects of any length)
        self._first_tokens: FirstTokens | None = None
        self._first_tokens_lock = threading.Lock()  # cells running beside each other (--jobs) share the kept tokens

    @classmethod
    def supports(cls, config) -> bool:
        return plain_llama(config)

    def target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs_embeds, target)

    def candidate_logits(self, hidden: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        rows = self.candidate_rows(candidate_ids)
        if rows is not self._packed_rows:
            self._candidate_linear.clear()
            self._packed_rows = rows
        return self._candidate_linear(hidden.to(rows.weight.device).float(), rows.weight, rows.bias)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = self.vocab_rows()
        return self._vocab_linear(hidden.to(rows.weight.device).float(), rows.weight, rows.bias)

    def hidden_at(self, inputs_embeds: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs_embeds, reads)

    def score_tokens(self, batches: Sequence[Batch], prompt: PromptInputs, candidates: CandidateVocab) -> Iterator[torch.Tensor]:
        """As `Backend.score_tokens`, through `_prompt_passes`."""
        for _, hidden, _ in self._prompt_passes(batches, prompt):
            yield self.candidate_logits(hidden, candidates.token_ids)

    def score_objects(self, batches: Sequence[Batch], prompt: PromptInputs, candidates: ObjectCandidates) -> Iterator[torch.Tensor]:
        """As `Backend.score_objects`: the prompt passes of `score_tokens` keep their keys and values, and the trie's
        inner nodes continue them, CONTEXT_POSITIONS node positions at a time."""
        contexts = candidates.contexts(self.kind)
        tokens, sees, depth = contexts.tree
        for batch, root, kv in self._prompt_passes(batches, prompt, keep_kv=len(tokens) > 0):
            hidden = root[:, None]
            if len(tokens):
                tree = self.embed(tokens.to(self.device))
                step = max(1, CONTEXT_POSITIONS // len(tokens))
                parts = [hidden]
                for r0 in range(0, len(batch.facts), step):
                    rows = torch.arange(r0, min(len(batch.facts), r0 + step), device=self.device)
                    start = kv.select(rows)
                    mask, positions = tree_attention(batch.target[rows], start.length, sees, depth, torch.float32,
                                                     float("-inf"))
                    reads = torch.arange(len(tokens), device=self.device).expand(len(rows), -1)
                    parts.append(self.forward(tree.expand(len(rows), -1, -1), reads, start, positions, mask))
                hidden = torch.cat([parts[0], torch.cat(parts[1:])], dim=1)
            yield candidates.normalise(contexts.sum_edges(self.edge_logprobs(hidden, contexts)))

    def _prompt_passes(self, batches: Sequence[Batch], prompt: PromptInputs, keep_kv: bool = False
                       ) -> Iterator[tuple[Batch, torch.Tensor, Start | None]]:
        """(batch on the device, hidden states (B, H) at its targets, and with `keep_kv` the keys and values of its
        positions, every row's whole input). With the same prompt in every row: without gradients, each distinct
        start runs once; with them, each batch runs as one sequence (`_one_sequence`)."""
        same_prompt = prompt.prefix is None and (prompt.embeddings is None or prompt.embeddings.dim() == 2)
        grad = torch.is_grad_enabled()
        starts = self.shared_starts(batches, prompt) if same_prompt and not grad else None
        done = 0
        for batch in batches:
            if same_prompt and grad and not keep_kv:
                batch = batch.to(self.device)
                yield batch, self._one_sequence(batch, prompt), None
                continue
            start = starts.for_rows(done, len(batch.facts)) if starts is not None else None
            done += len(batch.facts)
            batch = batch.to(self.device)
            n = start.length if start is not None else 0
            embeds = self.input_embeddings(batch, prompt)[:, n:]
            with self.prefix_tuning(prompt.prefix, batch.virtual_mask):
                hidden, kv = self.forward.with_kv(embeds, batch.target - n, start) if keep_kv else (
                    self.forward(embeds, batch.target - n, start), None)
            yield batch, hidden, kv

    def _one_sequence(self, batch: Batch, prompt: PromptInputs) -> torch.Tensor:
        """Hidden states (B, H) at a batch's targets, its rows run as one sequence: first the tokens that every row
        begins with (leading virtual tokens or template words), once, then each row's own tokens up to its target.
        Each token sees the shared start and its own row's earlier tokens, at its position in its row; the weights'
        products skip the repeated start and the padding."""
        x, positions, mask, targets = self._sequence_of(batch, prompt)
        return self.forward(x[None], targets[None], None, positions[None], mask[None])[0]

    def _sequence_of(self, batch: Batch, prompt: PromptInputs) -> tuple[torch.Tensor, ...]:
        """A batch as one sequence (see `_one_sequence`): its inputs (T, H), positions (T,), additive mask (T, T) and
        each row's last token (B,)."""
        embeds = self.input_embeddings(batch, prompt)  # (B, L, H)
        B, L, _ = embeds.shape
        first = int(batch.target.min())
        n = _common_start(batch.input_ids[:, :first], batch.virtual_mask[:, :first])  # every row keeps its target
        place = torch.arange(n, L, device=self.device)
        own = place[None] <= batch.target[:, None]  # (B, L - n): each row's tokens after the start
        row = torch.arange(B, device=self.device)[:, None].expand(-1, L - n)[own]
        x = torch.cat([embeds[0, :n], embeds[:, n:][own]])  # (n + own tokens, H)
        positions = torch.cat([torch.arange(n, device=self.device), place.expand(B, -1)[own]])
        rows = torch.cat([row.new_full((n,), -1), row])  # -1: the shared start
        sees = (positions[None] <= positions[:, None]) & ((rows[None] == -1) | (rows[None] == rows[:, None]))
        mask = torch.zeros(sees.shape, device=self.device).masked_fill(~sees, float("-inf"))
        targets = n + own.sum(dim=1).cumsum(dim=0) - 1  # each row's last token
        return x, positions, mask, targets

    def pack_loss(self, parts) -> list[torch.Tensor]:
        """As `Backend.pack_loss`; while training prompts that are one set of vectors each, every part runs as one
        sequence (`_one_sequence`), the parts side by side in one batch, each padded to the longest with tokens that
        see only themselves."""
        shared = all(p.prefix is None and (p.embeddings is None or p.embeddings.dim() == 2) for _, p, _ in parts)
        candidates = parts[0][2]
        if (len(parts) == 1 or not shared or not torch.is_grad_enabled()
                or isinstance(candidates, ObjectCandidates) or any(c is not candidates for _, _, c in parts)):
            return super().pack_loss(parts)
        batches = [batch.to(self.device) for batch, _, _ in parts]
        sequences = [self._sequence_of(batch, prompt) for batch, (_, prompt, _) in zip(batches, parts, strict=True)]
        T = max(x.shape[0] for x, *_ in sequences)
        width = max(len(t) for *_, t in sequences)
        xs, positions, masks, targets = [], [], [], []
        for x, pos, mask, target in sequences:
            pad = T - x.shape[0]
            xs.append(F.pad(x, (0, 0, 0, pad)))
            positions.append(F.pad(pos, (0, pad)))
            blocked = torch.full((T, T), float("-inf"), device=self.device)
            blocked[: x.shape[0], : x.shape[0]] = mask
            blocked[torch.arange(x.shape[0], T), torch.arange(x.shape[0], T)] = 0.0  # padding sees itself
            masks.append(blocked)
            targets.append(F.pad(target, (0, width - len(target)), value=x.shape[0] - 1))
        hidden = self.forward(torch.stack(xs), torch.stack(targets), None, torch.stack(positions), torch.stack(masks))
        losses = []
        for k, (batch, _, _) in enumerate(parts):
            scores = self.candidate_logits(hidden[k, : len(batch.facts)], candidates.token_ids)
            losses.append(F.cross_entropy(scores.float(), batches[k].gold, reduction="none"))
        return losses

    def shared_starts(self, batches: Sequence[Batch], prompt: PromptInputs) -> SharedStarts | None:
        """The starts of the inputs of `batches`, each distinct one run once (see `SharedStarts`); None if no
        input shares its start with another. Every input keeps at least its target position to run."""
        if not batches:
            return None
        longest = min(int(b.target.min()) for b in batches)
        ids = torch.cat([b.input_ids[:, :longest] for b in batches])  # every input's tokens before the first target
        virtual = torch.cat([b.virtual_mask[:, :longest] for b in batches])
        n = _common_start(ids, virtual)
        start = None
        if n:
            embeds = self.input_embeddings(batches[0].to(self.device), prompt)
            start = self.forward.start_kv(embeds[:1, :n])
        k = _distinct_tokens_after(ids[:, n:], virtual[:, n:])
        if not k:
            return SharedStarts(start, n, None) if start is not None else None
        distinct, row_start = ids[:, n : n + k].unique(dim=0, return_inverse=True)
        if n == 0 and k == 1:  # the inputs' first tokens: kept across relations
            start = self.first_token_starts(distinct[:, 0])
        else:
            start = self.forward.start_kv(self.embed(distinct.to(self.device)), start)
        return SharedStarts(start, n, row_start.to(self.device))

    def first_token_starts(self, ids: torch.Tensor) -> Start:
        """`start_kv` of inputs that begin with the tokens `ids` (U,), one row each. A first token sees no
        other, so its keys and values are run once per token and kept for later relations (run again if the
        weights change; at most FIRST_TOKENS_MAX tokens are kept). New tokens run in passes of FIRST_TOKENS_CHUNK
        rows, the last padded: a CPU's bfloat16 products round by how many rows they multiply, so a token's keys
        and values, and a relation's figures, would otherwise depend on the relations run before it."""
        with self._first_tokens_lock:
            return self._first_token_starts(ids)

    def _first_token_starts(self, ids: torch.Tensor) -> Start:
        stamp = tuple(weight_stamp(p) for p in self.model.parameters())
        kept = self._first_tokens
        if kept is None or kept.stamp != stamp:
            kept = self._first_tokens = FirstTokens(stamp)
        new = list(dict.fromkeys(t for t in ids.tolist() if t not in kept.row))
        if len(kept.row) + len(new) > FIRST_TOKENS_MAX:  # start over with only these tokens
            kept = self._first_tokens = FirstTokens(stamp)
            new = list(dict.fromkeys(ids.tolist()))
        parts = [] if kept.start is None else [kept.start]
        for i in range(0, len(new), FIRST_TOKENS_CHUNK):
            chunk = new[i : i + FIRST_TOKENS_CHUNK]
            padded = chunk + chunk[-1:] * (FIRST_TOKENS_CHUNK - len(chunk))
            run = self.forward.start_kv(self.embed(torch.tensor(padded, device=self.device)[:, None]))
            parts.append(Start([k[: len(chunk)] for k in run.keys], [v[: len(chunk)] for v in run.values]))
        if new:
            kept.start = Start.cat(parts)
            kept.row.update({t: len(kept.row) + j for j, t in enumerate(new)})
        return kept.start.select(torch.tensor([kept.row[t] for t in ids.tolist()], device=self.device))


def _common_start(ids: torch.Tensor, virtual: torch.Tensor) -> int:
    """How many leading positions every row of `ids` (and of its virtual-slot mask) has alike."""
    differ = ((ids != ids[0]) | (virtual != virtual[0])).any(dim=0).nonzero()
    return int(differ[0]) if len(differ) else ids.shape[1]


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
