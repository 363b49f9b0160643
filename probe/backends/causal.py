"""Any causal LM (GPT-2, Qwen, Mistral, ...) through the plain transformers forward."""

from __future__ import annotations

import torch

from probe.backends.base import Backend, register


@register
class CausalLM(Backend):
    """The last layer's (normed) hidden state at the target, the position before the object.

    Rows are right-padded, so no attention mask is needed: a causal model never looks to the right.
    """

    kind = "causal"

    def target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)
        return self.body(inputs_embeds=inputs_embeds).last_hidden_state[rows, target]
