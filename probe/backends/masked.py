"""Any masked LM (BERT, RoBERTa, ELECTRA, ...) through the plain transformers forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from probe.backends.base import Backend, PromptInputs, register
from probe.batching import Batch
from probe.objects import Contexts

MASKED_ROWS = 1024  # expanded inputs run at once when scoring objects of any length


@register
class MaskedLM(Backend):
    """The body's hidden state at the [MASK], through the MLM head's transform; candidates from the decoder rows.

    A model whose head cannot be split into a transform and a decoder runs whole, and its logits are read.
    Objects of any length: k [MASK]s where the object goes; its i-th token is read with the tokens before it filled in
    and the later ones still masked (within-word left-to-right pseudo-log-likelihood), one input per object length
    and filled-in prefix (`Contexts`).
    """

    kind = "masked"

    def __init__(self, model, tokenizer, name: str, device: str = "cpu", control: str = "none"):
        super().__init__(model, tokenizer, name, device, control)
        self.transform = _head_transform(model)  # None: no separable head

    def target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)
        mask = None if bool(attention_mask.all()) else attention_mask
        if self.transform is None:  # logits at the target: candidate_logits picks the candidates' columns
            return self.model(inputs_embeds=inputs_embeds, attention_mask=mask).logits[rows, target]
        hidden = self.body(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state[rows, target]
        return self.transform(hidden)

    def candidate_logits(self, hidden: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return hidden.float()[:, candidate_ids.to(hidden.device)]
        return super().candidate_logits(hidden, candidate_ids)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() if self.transform is None else super().vocab_logits(hidden)

    def context_hidden(self, batch: Batch, prompt: PromptInputs, contexts: Contexts) -> torch.Tensor:
        B, X = len(batch.facts), len(contexts.keys)
        mask = self.tokenizer.mask_token_id
        fills = [list(prefix) + [mask] * (k - len(prefix)) for k, prefix in contexts.keys]
        shifts = torch.tensor([len(prefix) for _, prefix in contexts.keys], device=self.device)
        rows = [b for b in range(B) for _ in range(X)]
        hidden = self._slots_hidden(batch, prompt, rows, fills * B, shifts.repeat(B))
        return hidden.view(B, X, -1)

    def gold_loglik(self, batch: Batch, prompt: PromptInputs, gold: list[tuple[int, ...]]) -> torch.Tensor:
        """The same within-word l2r pseudo-log-likelihood, for the gold object of each row."""
        mask = self.tokenizer.mask_token_id
        rows = [b for b, g in enumerate(gold) for _ in g]
        fills = [list(g[:i]) + [mask] * (len(g) - i) for g in gold for i in range(len(g))]
        shifts = torch.tensor([i for g in gold for i in range(len(g))], device=self.device)
        tokens = torch.tensor([t for g in gold for t in g], device=self.device)
        logp = self.vocab_logits(self._slots_hidden(batch, prompt, rows, fills, shifts)).log_softmax(dim=-1)
        picked = logp.gather(1, tokens[:, None])[:, 0]
        return picked.new_zeros(len(gold)).index_add(0, torch.tensor(rows, device=self.device), picked)

    def _slots_hidden(self, batch: Batch, prompt: PromptInputs, rows: list[int], fills: list[list[int]],
                      shifts: torch.Tensor) -> torch.Tensor:
        """Hidden states (R, H) at the target + `shifts[r]` of batch rows `rows` whose [MASK] is replaced by `fills`."""
        out = []
        for r0 in range(0, len(rows), MASKED_ROWS):
            chunk = rows[r0:r0 + MASKED_ROWS]
            part = batch.splice(chunk, fills[r0:r0 + MASKED_ROWS], replace=True, pad_id=self.pad_id)
            vectors = prompt.embeddings
            if vectors is not None and vectors.dim() == 3:  # one set per row (the trigger search): follow the rows
                vectors = vectors[torch.tensor(chunk, device=vectors.device)]
            embeds = self.input_embeddings(part, PromptInputs(vectors, prompt.prefix))
            with self.prefix_tuning(prompt.prefix, part.virtual_mask):
                out.append(self.target_hidden(embeds, part.attention_mask, part.target + shifts[r0:r0 + MASKED_ROWS]))
        return torch.cat(out)


def _head_transform(model) -> nn.Module | None:
    """The MLM head's transform (what runs between the body and the decoder), when one child holds the decoder."""
    decoder = model.get_output_embeddings()
    base = model.base_model
    holders = [m for m in model.children() if m is not base and any(x is decoder for x in m.modules())]
    if len(holders) != 1:
        return None
    holder = holders[0]
    # BERT: cls.predictions.{transform, decoder}; RoBERTa: lm_head.{dense, layer_norm, decoder}
    if hasattr(holder, "predictions") and hasattr(holder.predictions, "transform"):
        return holder.predictions.transform
    if hasattr(holder, "transform"):
        return holder.transform
    if all(hasattr(holder, a) for a in ("dense", "layer_norm")):
        return _DenseGeluNorm(holder)
    return None


class _DenseGeluNorm(nn.Module):
    """RoBERTa's head transform: layer_norm(gelu(dense(h)))."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.layer_norm(F.gelu(self.head.dense(h)))
