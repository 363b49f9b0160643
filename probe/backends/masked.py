"""Any masked LM (BERT, RoBERTa, ELECTRA, ...) through the plain transformers forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from probe.backends.base import Backend, register


@register
class MaskedLM(Backend):
    """The body's hidden state at the [MASK], through the MLM head's transform; candidates from the decoder rows.

    A model whose head cannot be split into a transform and a decoder runs whole, and its logits are read.
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
