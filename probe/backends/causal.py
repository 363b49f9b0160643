"""Any causal LM (GPT-2, Qwen, Mistral, ...) through the plain transformers forward."""

from __future__ import annotations

import inspect
from functools import cached_property

import torch

from probe.backends.base import Backend, PromptInputs, register
from probe.batching import Batch
from probe.objects import Contexts


@register
class CausalLM(Backend):
    """The last layer's (normed) hidden state at the target, the position before the object.

    Rows are right-padded, so no attention mask is needed: a causal model never looks to the right.
    Objects of any length: the prompt runs once per row, then the candidates' token trie runs as one sequence
    after it, each trie node seeing the prompt and its own ancestors (`tree_attention`), from the prompt's
    cached keys and values.
    """

    kind = "causal"

    @cached_property
    def cache_name(self) -> str:
        """What the model's forward calls its key/value cache, as argument and in its output: `cache` from
        transformers 5.2x on, `past_key_values` before (still read there, with a deprecation warning)."""
        return "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"

    def target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)
        return self.body(inputs_embeds=inputs_embeds).last_hidden_state[rows, target]

    def hidden_at(self, inputs_embeds: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, H) at positions `reads` (B, T) of right-padded inputs."""
        rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)
        return self.body(inputs_embeds=inputs_embeds).last_hidden_state[rows[:, None], reads]

    def context_hidden(self, batch: Batch, prompt: PromptInputs, contexts: Contexts) -> torch.Tensor:
        embeds = self.input_embeddings(batch, prompt)
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        with self.prefix_tuning(prompt.prefix, batch.virtual_mask):
            out = self.body(inputs_embeds=embeds, use_cache=True)
        root = out.last_hidden_state[rows, batch.target][:, None]
        if len(contexts.keys) == 1:
            return root
        tokens, sees, depth = contexts.tree
        mask, positions = tree_attention(batch.target, embeds.shape[1], sees, depth, self.dtype, torch.finfo(self.dtype).min)
        tree = self.embed(tokens.to(self.device)).expand(len(rows), -1, -1)
        hidden = self.body(inputs_embeds=tree, attention_mask=mask[:, None], position_ids=positions,
                           **{self.cache_name: out[self.cache_name]}).last_hidden_state
        return torch.cat([root, hidden], dim=1)

    def gold_loglik(self, batch: Batch, prompt: PromptInputs, gold: list[tuple[int, ...]]) -> torch.Tensor:
        """Teacher-forced: the gold's tokens but the last follow the prompt, and each is predicted from before it."""
        taught = batch.splice(list(range(len(gold))), [g[:-1] for g in gold], replace=False, pad_id=self.pad_id)
        longest = max(len(g) for g in gold)
        steps = torch.arange(longest, device=self.device)
        reads = (taught.target[:, None] + steps).clamp(max=taught.input_ids.shape[1] - 1)
        embeds = self.input_embeddings(taught, prompt)
        with self.prefix_tuning(prompt.prefix, taught.virtual_mask):
            hidden = self.hidden_at(embeds, reads)
        return _gold_sum(self, hidden, gold)


def _gold_sum(backend: Backend, hidden: torch.Tensor, gold: list[tuple[int, ...]]) -> torch.Tensor:
    """Sum over each row of log p(gold token t | hidden state t), hidden (B, T, H); rows shorter than T padded."""
    B, T, H = hidden.shape
    tokens = torch.tensor([list(g) + [0] * (T - len(g)) for g in gold], device=hidden.device)
    real = torch.tensor([[t < len(g) for t in range(T)] for g in gold], device=hidden.device)
    logp = backend.vocab_logits(hidden.reshape(B * T, H)).log_softmax(dim=-1).view(B, T, -1)
    picked = logp.gather(2, tokens[..., None])[..., 0]
    return (picked * real).sum(dim=1)


def tree_attention(target: torch.Tensor, prompt_length: int, sees: torch.Tensor, depth: torch.Tensor,
                   dtype: torch.dtype, blocked: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive mask (B, N, L + N) and positions (B, N) of N trie nodes run after right-padded prompts of
    length L: each node sees its row's prompt up to the target and its own ancestors (`sees`, (N, N)), at the
    position its depth puts it after the target. `blocked` is the value of a masked score."""
    B, N = target.shape[0], sees.shape[0]
    device = target.device
    prompt = (torch.arange(prompt_length, device=device)[None, None] <= target[:, None, None]).expand(B, N, prompt_length)
    allowed = torch.cat([prompt, sees.to(device)[None].expand(B, N, N)], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, blocked)
    return mask, target[:, None] + depth.to(device)[None]
