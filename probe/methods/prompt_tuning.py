"""Prompt tuning (Lester et al. 2021; OptiPrompt): the virtual-token embeddings themselves are trained."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from probe.errors import ProbeError
from probe.methods.base import MethodConfig, PromptMethod
from probe.templates import manual_relation_words

INITS = ("random", "vocab", "template")


@dataclass
class PromptTuningConfig(MethodConfig):
    init: str = "vocab"  # random | vocab | template


class PromptTuning(PromptMethod):
    """One trainable vector per virtual token, initialised from noise, vocabulary rows or template words."""

    name = "prompt-tuning"
    trainable = True
    config_class = PromptTuningConfig
    default_lr = 1e-2  # raw embeddings need larger steps than the reparameterised P-tuning encoder

    def __init__(self, n_virtual: int, hidden_size: int, config: PromptTuningConfig | None = None,
                 init: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size, config)
        if self.config.init not in INITS:
            raise ProbeError(f"unknown init {self.config.init!r}: expected one of {', '.join(INITS)}")
        self.prompt = nn.Parameter(init.clone().float() if init is not None else torch.randn(n_virtual, hidden_size))

    @classmethod
    def create(cls, backend, compiled, manual_template: str, config: PromptTuningConfig | None = None) -> PromptTuning:
        config = config or PromptTuningConfig()
        if config.init not in INITS:
            raise ProbeError(f"unknown init {config.init!r}: expected one of {', '.join(INITS)}")
        table = backend.model.get_input_embeddings().weight.detach().float().cpu()
        n = compiled.n_virtual
        if config.init == "random":
            init = torch.randn(n, table.shape[1]) * table.std()
        elif config.init == "vocab":  # rows of real tokens, drawn from the lower (frequent) ids of the vocabulary
            init = table[torch.randint(min(5000, table.shape[0]), (n,))]
        else:
            words = manual_relation_words(manual_template)
            ids = backend.tokenizer.encode(" " + words, add_special_tokens=False) or [0]
            init = table[torch.tensor([ids[i % len(ids)] for i in range(n)])]
        return cls(n, table.shape[1], config, init=init)

    def virtual_embeddings(self) -> torch.Tensor:
        return self.prompt
