"""AutoPrompt (Shin et al. 2020): real vocabulary tokens (triggers) in the virtual slots, found by search.

The search itself is in probe/autoprompt.py; this class only holds the trigger ids and turns them
into the LM's own input-embedding rows, so the shared evaluator needs nothing special.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from probe.methods.base import MethodConfig, PromptMethod
from probe.templates import OBJ, SUB, TEXT, VIRTUAL, CompiledTemplate, encode_words

INIT_WORD = "the"  # every trigger starts as this word (as a word start: ' the' for BPE vocabularies)


class AutoPrompt(PromptMethod):
    """Trigger token ids, one per virtual slot; `virtual_embeddings()` looks them up in the LM's table."""

    name = "autoprompt"
    trainable = True  # `probe train` runs it, through search_triggers rather than gradient descent

    def __init__(self, n_virtual: int, hidden_size: int, config: MethodConfig | None = None,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None, trigger_ids: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size, config)
        ids = trigger_ids if trigger_ids is not None else torch.zeros(n_virtual, dtype=torch.long)
        self.register_buffer("trigger_ids", ids.clone().long())
        self.embed = embed  # the LM's ids -> input embeddings (a function, so the LM stays out of state_dict)

    @classmethod
    def create(cls, backend, compiled: CompiledTemplate, manual_template: str,
               config: MethodConfig | None = None) -> AutoPrompt:
        ids = encode_words(backend.tokenizer, INIT_WORD, True, compiled.space_sensitive)
        init = torch.full((compiled.n_virtual,), ids[0], dtype=torch.long)
        return cls(compiled.n_virtual, backend.hidden_size, config, backend.embed, init)

    def virtual_embeddings(self) -> torch.Tensor:
        return self.embed(self.trigger_ids)

    def saved_info(self, compiled: CompiledTemplate) -> dict:
        """The triggers as ids, tokens, and the template filled with them: `[X] tok tok tok [Y]`."""
        tok = compiled.tokenizer
        ids = self.trigger_ids.tolist()
        tokens = tok.convert_ids_to_tokens(ids)
        decoded = [tok.decode([i]).strip() for i in ids]
        words = iter(d if d and "\ufffd" not in d else t for d, t in zip(decoded, tokens, strict=True))
        shown = {SUB: "[X]", OBJ: "[Y]"}
        text = []
        for part in compiled.template.parts:
            if part.kind == VIRTUAL:
                text.extend(next(words) for _ in range(part.n))
            else:
                text.append(part.text if part.kind == TEXT else shown[part.kind])
        return {"triggers": {"ids": ids, "tokens": tokens, "text": " ".join(text)}}
