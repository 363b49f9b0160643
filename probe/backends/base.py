"""The interface every backend implements, and the registry that picks one for a model.

A backend wraps one frozen LM. Evaluation, training and the trigger search go through two calls:
- `score(batches, prompt, candidates)` yields the scores (B, C) of every candidate for each input: single
  tokens' float32 logits at the target position (`score_tokens`), or, for objects of any length, the float64
  log-likelihoods of their tokens (`score_objects`, see probe/objects.py);
- `gold_loss(batch, prompt, candidates)`: each row's loss, the cross-entropy of the gold among single-token
  candidates or the negative log-likelihood of the gold object's tokens.
A subclass says how to reach the target hidden state (`target_hidden`) and the hidden states of objects'
contexts (`context_hidden`, `gold_loglik`), and may override `score_tokens` wholesale to run faster (llama.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from probe.batching import Batch
from probe.errors import ModelError
from probe.objects import Contexts, ObjectCandidates
from probe.vocab import CandidateVocab

LOGIT_ROWS = 128  # rows of full-vocabulary logits computed at once (objects of any length)
CONTEXT_POSITIONS = 8192  # (row, context) pairs whose hidden states are computed at once (objects of any length)


class PromptInputs(NamedTuple):
    """What a prompt method puts into the LM.

    embeddings: (n_virtual, H) for the virtual slots of every row, or (B, n, H), one set per row (a row with fewer
    virtual slots than n takes the first of its set: rows of several prompts, packed).
    prefix: prefix-tuning's keys (layers, n_virtual, key_dim) and values (layers, n_virtual, value_dim), which
    replace at every layer what the key and value projections compute at the virtual positions; or (layers, B, n, dim),
    one set per row.
    """

    embeddings: torch.Tensor | None = None
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None


PackPart = tuple  # (Batch, PromptInputs, candidates): one prompt's rows in a pass that serves several


def per_row(prompts: Sequence[PromptInputs], counts: Sequence[int], slots: Sequence[int]) -> PromptInputs:
    """The prompts of several parts as one per-row PromptInputs: part k's prompt for each of its `counts[k]` rows (or
    its own per-row prompt), padded to the most virtual slots (`slots[k]` each); the rows keep only their first
    `slots[k]` vectors."""
    n = max(slots)

    def rows(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:  # (n_k, d) or (c_k, n_k, d) -> (B, n, d)
        out = []
        for t, c in zip(tensors, counts, strict=True):
            t = F.pad(t, (0, 0, 0, n - t.shape[-2])) if t.shape[-2] < n else t
            out.append(t if t.dim() == dim + 3 else t.unsqueeze(dim).expand(*t.shape[:dim], c, *t.shape[dim:]))
        return torch.cat(out, dim=dim)

    embeddings = None
    if prompts[0].embeddings is not None:
        embeddings = rows([p.embeddings for p in prompts], 0)
    prefix = None
    if prompts[0].prefix is not None:
        prefix = (rows([p.prefix[0] for p in prompts], 1), rows([p.prefix[1] for p in prompts], 1))
    return PromptInputs(embeddings, prefix)


def _valid_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row vectors (B, n, D) in the order a mask (B, L) takes them: each row's first (its own count of) vectors."""
    counts = mask.sum(dim=1)
    keep = torch.arange(rows.shape[1], device=rows.device)[None] < counts.to(rows.device)[:, None]
    return rows[keep]


class Prompt(Protocol):
    """Anything that says what a prompt puts into the LM: a prompt method, a saved prompt."""

    def prompt_inputs(self) -> PromptInputs: ...


def weight_stamp(weight: torch.Tensor) -> tuple:
    """Changes when `weight` is changed in place, has its .data replaced, or changes dtype."""
    return weight._version, weight.data_ptr(), weight.dtype


@dataclass
class CandidateRows:
    """The output-layer rows of a candidate set, in float32 (kept while the candidates and the weights stay the same)."""

    token_ids: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    stamp: tuple = ()


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs, to skip the rest of a forward pass."""


class Backend:
    """A frozen LM behind one interface. Subclasses set `kind` ('masked' or 'causal') and `target_hidden`."""

    kind: ClassVar[str] = ""

    def __init__(self, model, tokenizer, name: str, device: str = "cpu", control: str = "none"):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.body = model.base_model
        self.control = control  # "random-model" when the weights were re-drawn (see probe.controls)
        self._candidate_rows: CandidateRows | None = None
        self._vocab_rows: CandidateRows | None = None  # every output row in float32 (objects of any length)
        self._kv_cache: list | None = None  # key/value projections, found on first use (prefix-tuning)

    @classmethod
    def supports(cls, config) -> bool:
        """Whether this backend computes exactly what transformers computes for a model with this config."""
        return True

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def max_positions(self) -> int | None:
        """The longest input the model takes (its context), when its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def pad_id(self) -> int:
        """The token that pads inputs on the right (never attended to as a real token)."""
        tok = self.tokenizer
        return next((t for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) if t is not None), 0)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, (B, L) -> (B, L, H)."""
        return self.model.get_input_embeddings()(input_ids)

    def input_embeddings(self, batch: Batch, prompt: PromptInputs) -> torch.Tensor:
        """Input embeddings (B, L, H) of a batch: the LM's, with the prompt's at the virtual slots."""
        embeds = self.embed(batch.input_ids)
        virtual = prompt.embeddings
        if virtual is not None:
            if virtual.dim() == 3:
                rows = _valid_rows(virtual, batch.virtual_mask)
            else:
                rows = virtual.repeat(batch.input_ids.shape[0], 1)
            embeds = embeds.masked_scatter(batch.virtual_mask[..., None], rows.to(embeds.dtype))
        return embeds

    # -- the scoring calls ----------------------------------------------------------------------------

    def score(self, batches: Sequence[Batch], prompt: PromptInputs, candidates: CandidateVocab | ObjectCandidates
              ) -> Iterator[torch.Tensor]:
        """Scores (B, C) of every candidate for each row, one tensor per batch, in order."""
        if isinstance(candidates, ObjectCandidates):
            return self.score_objects(batches, prompt, candidates)
        return self.score_tokens(batches, prompt, candidates)

    def score_tokens(self, batches: Sequence[Batch], prompt: PromptInputs, candidates: CandidateVocab) -> Iterator[torch.Tensor]:
        """Float32 scores (B, C) of every candidate token at each row's target position."""
        for batch in batches:
            batch = batch.to(self.device)
            embeds = self.input_embeddings(batch, prompt)
            with self.prefix_tuning(prompt.prefix, batch.virtual_mask):
                hidden = self.target_hidden(embeds, batch.attention_mask, batch.target)
            yield self.candidate_logits(hidden, candidates.token_ids)

    def score_objects(self, batches: Sequence[Batch], prompt: PromptInputs, candidates: ObjectCandidates) -> Iterator[torch.Tensor]:
        """Float64 log-likelihoods (B, C) of every candidate object's tokens after each row's prompt."""
        contexts = candidates.contexts(self.kind)
        step = max(1, CONTEXT_POSITIONS // len(contexts.keys))  # rows whose contexts run at once
        for batch in batches:
            batch = batch.to(self.device)
            hidden = torch.cat([self.context_hidden(batch.select(range(r0, min(len(batch.facts), r0 + step))), prompt,
                                                    contexts) for r0 in range(0, len(batch.facts), step)])
            yield candidates.normalise(contexts.sum_edges(self.edge_logprobs(hidden, contexts)))

    def gold_loss(self, batch: Batch, prompt: PromptInputs, candidates: CandidateVocab | ObjectCandidates) -> torch.Tensor:
        """Each row's loss (B,): cross-entropy of the gold among single-token candidates, or the negative
        log-likelihood of the gold object's tokens (divided by their count under --length-norm)."""
        if isinstance(candidates, ObjectCandidates):
            batch = batch.to(self.device)
            gold = [candidates.sequences[g] for g in batch.gold.tolist()]
            loglik = self.gold_loglik(batch, prompt, gold)
            if candidates.length_norm:
                loglik = loglik / candidates.lengths.to(loglik.device)[batch.gold]
            return -loglik
        (scores,) = self.score_tokens([batch], prompt, candidates)
        return F.cross_entropy(scores.float(), batch.gold.to(scores.device), reduction="none")

    def pack_loss(self, parts: Sequence[PackPart]) -> list[torch.Tensor]:
        """Each part's rows' losses (B_k,), as `gold_loss` gives them, for several prompts' batches (one part each) in
        one pass: the LM is frozen and rows are independent, so each prompt's gradient is its own (float32 sums may
        come in another order than alone, the product having more rows). Parts of one set of single-token candidates
        run as one batch, each row with its own prompt; others run part by part, as alone."""
        if (len(parts) == 1 or isinstance(parts[0][2], ObjectCandidates)
                or any(p[2] is not parts[0][2] for p in parts)):
            return [self.gold_loss(batch, prompt, candidates) for batch, prompt, candidates in parts]
        batches = [batch.to(self.device) for batch, _, _ in parts]
        merged = Batch.cat(batches, self.pad_id)
        counts = [len(b.facts) for b in batches]
        slots = [int(b.virtual_mask[0].sum()) for b in batches]
        losses = self.gold_loss(merged, per_row([p for _, p, _ in parts], counts, slots), parts[0][2])
        return list(losses.split(counts))

    def score_pack(self, parts: Sequence[PackPart]) -> list[list[torch.Tensor]]:
        """Scores (B, C) of every batch of several prompts' batch lists (one part each, as `score` takes them): the
        batches of parts of one set of single-token candidates run side by side, batch by batch, each row with its own
        prompt; others part by part, each as `score` alone."""
        candidates = parts[0][2] if parts else None
        if (len(parts) < 2 or isinstance(candidates, ObjectCandidates)
                or any(c is not candidates for _, _, c in parts)):
            return [list(self.score(batches, prompt, c)) for batches, prompt, c in parts]
        out: list[list[torch.Tensor]] = [[] for _ in parts]
        for i in range(max(len(batches) for batches, _, _ in parts)):
            here = [(k, batches[i], prompt) for k, (batches, prompt, _) in enumerate(parts) if i < len(batches)]
            batches = [b.to(self.device) for _, b, _ in here]
            counts = [len(b.facts) for b in batches]
            slots = [int(b.virtual_mask[0].sum()) for b in batches]
            merged = Batch.cat(batches, self.pad_id)
            (scores,) = self.score([merged], per_row([p for _, _, p in here], counts, slots), candidates)
            for (k, _, _), part in zip(here, scores.split(counts), strict=True):
                out[k].append(part)
        return out

    def context_hidden(self, batch: Batch, prompt: PromptInputs, contexts: Contexts) -> torch.Tensor:
        """Hidden states (B, X, H), ready for the output layer, that predict the next object token in each context."""
        raise NotImplementedError

    def gold_loglik(self, batch: Batch, prompt: PromptInputs, gold: list[tuple[int, ...]]) -> torch.Tensor:
        """log p of each row's gold object tokens (B,), float32, with gradients when they are on."""
        raise NotImplementedError

    def edge_logprobs(self, hidden: torch.Tensor, contexts: Contexts) -> torch.Tensor:
        """log p(token | context) (B, E) in float64 of every edge, from the contexts' hidden states (B, X, H).

        The first context's tokens go through `candidate_logits` as single-token candidates do, so that single-token
        objects rank exactly as in the single-token path; the normaliser is the full vocabulary's.
        """
        B, X, H = hidden.shape
        edge_context, edge_token = contexts.edge_context.to(hidden.device), contexts.edge_token.to(hidden.device)
        logits = hidden.new_empty(B, len(edge_token), dtype=torch.float32)
        lse = hidden.new_empty(B, X, dtype=torch.float32)
        step = max(1, LOGIT_ROWS // B)
        for x0 in range(0, X, step):
            x1 = min(X, x0 + step)
            full = self.vocab_logits(hidden[:, x0:x1].reshape(-1, H)).view(B, x1 - x0, -1)
            lse[:, x0:x1] = full.logsumexp(dim=-1)
            here = ((edge_context >= x0) & (edge_context < x1)).nonzero()[:, 0]
            logits[:, here] = full[:, edge_context[here] - x0, edge_token[here]]
        first = (edge_context == 0).nonzero()[:, 0]
        logits[:, first] = self.candidate_logits(hidden[:, 0], edge_token[first])
        return logits.double() - lse.double()[:, edge_context]

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of every token of the vocabulary, (R, H) -> (R, V)."""
        rows = self.vocab_rows()
        return F.linear(hidden.to(rows.weight.device).float(), rows.weight, rows.bias)

    def vocab_rows(self) -> CandidateRows:
        """Every output row in float32: kept while the weights stay the same; taken afresh while the output layer
        trains, so that gradients reach it."""
        out = self.output_layer()
        if out.weight.requires_grad and torch.is_grad_enabled():
            return CandidateRows(torch.empty(0), out.weight.float(), out.bias.float() if getattr(out, "bias", None) is not None
                                 else None)
        rows, stamp = self._vocab_rows, weight_stamp(out.weight)
        if rows is None or rows.stamp != stamp:
            with torch.no_grad():
                rows = self._vocab_rows = self._rows_of(out, torch.arange(out.weight.shape[0]))
        return rows

    def target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The final hidden state at each row's target position, (B, H), ready for the output layer."""
        raise NotImplementedError

    def output_layer(self) -> nn.Module:
        """The module whose weight rows (and bias) score tokens from a target hidden state."""
        return self.model.get_output_embeddings()

    def candidate_logits(self, hidden: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Float32 scores of the candidate tokens from target hidden states, (B, H) -> (B, C)."""
        rows = self.candidate_rows(candidate_ids)
        return F.linear(hidden.to(rows.weight.device).float(), rows.weight, rows.bias)

    def candidate_rows(self, candidate_ids: torch.Tensor) -> CandidateRows:
        """The candidates' output rows: kept while neither they nor the weights change; while the output layer
        itself trains (fine-tuning), taken afresh each time so that gradients reach it."""
        out = self.output_layer()
        if out.weight.requires_grad and torch.is_grad_enabled():
            return self._rows_of(out, candidate_ids)
        rows, stamp = self._candidate_rows, weight_stamp(out.weight)
        if rows is None or rows.stamp != stamp or not torch.equal(rows.token_ids, candidate_ids):
            with torch.no_grad():
                rows = self._candidate_rows = self._rows_of(out, candidate_ids)
        return rows

    @staticmethod
    def _rows_of(out: nn.Module, candidate_ids: torch.Tensor) -> CandidateRows:
        ids = candidate_ids.to(out.weight.device)
        bias = out.bias[ids].float() if getattr(out, "bias", None) is not None else None
        return CandidateRows(candidate_ids.clone(), out.weight[ids].float(), bias, weight_stamp(out.weight))

    # -- prefix-tuning: keys and values at the virtual positions of every layer -----------------------

    @contextmanager
    def prefix_tuning(self, prefix: tuple[torch.Tensor, torch.Tensor] | None, virtual_mask: torch.Tensor):
        """While inside, every layer's keys and values at the `virtual_mask` (B, L) positions are the prefix's."""
        if prefix is None:
            yield
            return
        with self._kv_hooks(lambda layer, which, out: _put_rows(out, virtual_mask, prefix[which == "values"][layer])):
            yield

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, key_dim, value_dim): the shape of one position's keys and values across the layers."""
        projections = self._kv_projections()
        k_mod, k_slice = projections[0][0]
        v_mod, v_slice = projections[0][1]
        return len(projections), _width(k_mod, k_slice), _width(v_mod, v_slice)

    @torch.no_grad()
    def token_kv(self, input_ids: torch.Tensor, layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values the LM computes for token ids (B, L): (layers, B, L, key_dim) and (layers, B, L, value_dim).

        Only the first `layers` layers are run when given. Tokens are read as they are, with no special tokens added.
        """
        n = layers or len(self._kv_projections())
        got: dict[tuple[int, str], torch.Tensor] = {}

        def capture(layer, which, out):
            got[layer, which] = out.float()
            if len(got) == 2 * n:
                raise _StopForward
            return out

        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        with self._kv_hooks(capture, n):
            try:
                embeds = self.embed(input_ids.to(self.device))
                self.target_hidden(embeds, torch.ones_like(input_ids), torch.zeros_like(rows))
            except _StopForward:
                pass
        keys = torch.stack([got[i, "keys"] for i in range(n)])
        values = torch.stack([got[i, "values"] for i in range(n)])
        return keys, values

    def _kv_projections(self) -> list[tuple[tuple[nn.Module, slice | None], tuple[nn.Module, slice | None]]]:
        """Per layer, the (module, output slice) computing keys and values; the model's own order of layers."""
        if self._kv_cache is None:
            self._kv_cache = _find_kv_projections(self.body)
            if not self._kv_cache:
                raise ModelError(
                    f"model {self.name!r}: prefix-tuning cannot find its key/value projections "
                    "(expected attention modules with k_proj/v_proj, key/value or GPT-2's c_attn)"
                )
        return self._kv_cache

    @contextmanager
    def _kv_hooks(self, fn, layers: int | None = None):
        """While inside, `fn(layer, 'keys'|'values', output)` sees (and may replace) every key/value projection output."""
        handles = []
        for layer, pair in enumerate(self._kv_projections()[:layers]):
            for which, (module, part) in zip(("keys", "values"), pair, strict=True):
                def hook(mod, args, out, layer=layer, which=which, part=part):
                    if part is None:
                        return fn(layer, which, out)
                    new = fn(layer, which, out[..., part])
                    return torch.cat([out[..., : part.start], new, out[..., part.stop:]], dim=-1)
                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _put_rows(out: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`out` (B, L, D) with the positions where `mask` (B, L) is set replaced, in order, by `rows`: (n, D) for every
    row, or (B, n, D) one set per row."""
    rows, mask = rows.to(out.device), mask.to(out.device)  # a layer on another device than the prompt (a device map)
    source = _valid_rows(rows, mask) if rows.dim() == 3 else rows.expand(out.shape[0], -1, -1)
    return out.masked_scatter(mask[..., None], source.to(out.dtype))


def _width(module: nn.Module, part: slice | None) -> int:
    if part is not None:
        return part.stop - part.start
    return module.out_features if hasattr(module, "out_features") else module.weight.shape[0]


def _find_kv_projections(body: nn.Module) -> list:
    """(key, value) projections of each self-attention module, as (module, output slice or None) pairs."""
    found = []
    for module in body.modules():
        if isinstance(getattr(module, "k_proj", None), nn.Linear) and isinstance(getattr(module, "v_proj", None), nn.Linear):
            found.append(((module.k_proj, None), (module.v_proj, None)))  # Llama, Mistral, Qwen, OPT, GPT-Neo
        elif all(isinstance(getattr(module, a, None), nn.Linear) for a in ("query", "key", "value")):
            found.append(((module.key, None), (module.value, None)))  # BERT, RoBERTa, ELECTRA
        elif hasattr(module, "c_attn") and hasattr(module, "split_size") and not getattr(module, "is_cross_attention", False):
            h = module.split_size  # GPT-2: one fused projection, outputs [query | key | value]
            found.append(((module.c_attn, slice(h, 2 * h)), (module.c_attn, slice(2 * h, 3 * h))))
    return found


# -- the registry ------------------------------------------------------------------------------------

BACKENDS: list[type[Backend]] = []


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available to `backend_class`."""
    BACKENDS.append(cls)
    return cls


def generic_backend(kind: str) -> type[Backend]:
    """The registered backend of `kind` that every model of that kind can run on (no family's fast path)."""
    return next(c for c in BACKENDS if c.kind == kind and not any(o is not c and issubclass(c, o) for o in BACKENDS))


def backend_class(config, kind: str) -> type[Backend]:
    """The most specific registered backend of `kind` that supports `config` (a family's before the generic one)."""
    fits = [c for c in BACKENDS if c.kind == kind and c.supports(config)]
    specific = [c for c in fits if not any(o is not c and issubclass(o, c) for o in fits)]
    if not specific:
        raise ModelError(f"no backend for a {kind} LM of model type {getattr(config, 'model_type', '?')!r}")
    return specific[0]
