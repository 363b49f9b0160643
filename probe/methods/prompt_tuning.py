"""Prompt tuning (Lester et al. 2021; OptiPrompt): the virtual-token embeddings themselves are trained."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from probe.methods.base import MethodConfig, option
from probe.methods.gradient import GradientPrompt
from probe.templates import manual_relation_words

INITS = ("random", "vocab", "template")
INIT_HELP = "where the prompt starts: random (noise), vocab (frequent tokens) or template (the manual template's words)"


def init_token_ids(tokenizer, vocab_size: int, n: int, init: str, manual_template: str,
                   start_ids: list[int | None] | None = None) -> torch.Tensor:
    """n real token ids to start a prompt from: 'vocab' draws frequent (low) ids, 'template' cycles the manual words.

    A template's word slots (`start_ids` not None, see CompiledTemplate) start as their own words either way.
    """
    if init == "vocab":
        ids = torch.randint(min(5000, vocab_size), (n,))
    else:
        words = tokenizer.encode(" " + manual_relation_words(manual_template), add_special_tokens=False) or [0]
        ids = torch.tensor([words[i % len(words)] for i in range(n)])
    for i, start in enumerate(start_ids or []):
        if start is not None:
            ids[i] = start
    return ids


@dataclass
class PromptTuningConfig(MethodConfig):
    init: str = option("vocab", INITS, INIT_HELP)


class PromptTuning(GradientPrompt):
    """One trainable vector per virtual token, initialised from noise, vocabulary rows or template words."""

    name = "prompt-tuning"
    summary = "the virtual-token embeddings themselves are trained (Lester et al. 2021; OptiPrompt)"
    config_class = PromptTuningConfig
    default_lr = 1e-2  # raw embeddings need larger steps than the reparameterised P-tuning encoder

    def __init__(self, n_virtual: int, hidden_size: int, config: PromptTuningConfig | None = None,
                 init: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size, config)
        self.config.check()
        self.prompt = nn.Parameter(init.clone().float() if init is not None else torch.randn(n_virtual, hidden_size))

    @classmethod
    def create(cls, backend, compiled, manual_template: str, config: PromptTuningConfig | None = None) -> PromptTuning:
        config = config or PromptTuningConfig()
        config.check()
        table = backend.model.get_input_embeddings().weight.detach().float().cpu()
        n = compiled.n_virtual
        if config.init == "random":
            init = torch.randn(n, table.shape[1]) * table.std()
        else:
            init = table[init_token_ids(backend.tokenizer, table.shape[0], n, config.init, manual_template,
                                        compiled.start_ids)]
        return cls(n, table.shape[1], config, init=init)

    def virtual_embeddings(self) -> torch.Tensor:
        return self.prompt
