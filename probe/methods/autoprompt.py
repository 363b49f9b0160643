"""AutoPrompt (Shin et al. 2020): real vocabulary tokens (triggers) in the virtual slots, found by search.

The search itself is in probe/autoprompt.py; this class only holds the trigger ids and turns them
into the LM's own input-embedding rows, so the shared evaluator needs nothing special.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from probe.errors import ProbeError
from probe.methods.base import MethodConfig, PromptMethod
from probe.templates import OBJ, SUB, TEXT, VIRTUAL, CompiledTemplate, Template, encode_words, manual_word_slots

INIT_WORD = "the"  # a trigger starts as this word (as a word start: ' the' for BPE vocabularies)
INITS = ("neutral", "manual")


@dataclass
class AutoPromptMethodConfig(MethodConfig):
    """`neutral`: triggers start as INIT_WORD in the template's virtual slots (Shin et al.). `manual`: the
    relation's manual prompt, its words before [Y] as triggers that start as themselves (AutoPrompt's
    initial-trigger option), so the search starts where the manual prompt stands."""

    init: str = "neutral"

    def check(self) -> None:
        if self.init not in INITS:
            raise ProbeError(f"unknown autoprompt init {self.init!r}: expected one of {', '.join(INITS)}")


class AutoPrompt(PromptMethod):
    """Trigger token ids, one per virtual slot; `virtual_embeddings()` looks them up in the LM's table."""

    name = "autoprompt"
    trainable = True  # `probe train` runs it, through search_triggers rather than gradient descent
    config_class = AutoPromptMethodConfig

    def __init__(self, n_virtual: int, hidden_size: int, config: AutoPromptMethodConfig | None = None,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None, trigger_ids: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size, config)
        ids = trigger_ids if trigger_ids is not None else torch.zeros(n_virtual, dtype=torch.long)
        self.register_buffer("trigger_ids", ids.clone().long())
        self.embed = embed  # the LM's ids -> input embeddings (a function, so the LM stays out of state_dict)

    @classmethod
    def relation_template(cls, template: Template, manual_template: str, kind: str,
                          config: AutoPromptMethodConfig | None = None) -> Template:
        if config is not None and config.init == "manual":
            return manual_word_slots(manual_template, kind)
        return template

    @classmethod
    def create(cls, backend, compiled: CompiledTemplate, manual_template: str,
               config: AutoPromptMethodConfig | None = None) -> AutoPrompt:
        """Virtual slots start as INIT_WORD, word slots as their own words."""
        neutral = encode_words(backend.tokenizer, INIT_WORD, True, compiled.space_sensitive)[0]
        init = torch.tensor([neutral if s is None else s for s in compiled.start_ids], dtype=torch.long)
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
        text = []
        for kind, value in compiled.parts:
            if kind == VIRTUAL:
                text.extend(next(words) for _ in range(value))
            elif kind == TEXT:
                text.append(tok.decode(value).strip())
            else:
                text.append("[X]" if kind == SUB else "[Y]")
                if kind == OBJ and compiled.kind == "causal":  # a causal model sees nothing after the object
                    break
        return {"triggers": {"ids": ids, "tokens": tokens, "text": " ".join(text)}}
