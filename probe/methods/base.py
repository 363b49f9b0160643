"""The one interface every prompt method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass
class MethodConfig:
    """Options shared by all methods; a method may subclass it with its own."""


class PromptMethod(nn.Module):
    """Turns a compiled template's virtual-token slots into input embeddings.

    The evaluator and trainer call `virtual_embeddings()` and put its rows, in order, into the
    virtual-token positions of every input. A method without virtual tokens returns None.
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate when --lr is not given (chosen on dev)

    def __init__(self, n_virtual: int, hidden_size: int, config: MethodConfig | None = None):
        super().__init__()
        self.n_virtual = n_virtual
        self.hidden_size = hidden_size
        self.config = config or self.config_class()

    @classmethod
    def create(cls, backend, compiled, manual_template: str, config: MethodConfig | None = None) -> PromptMethod:
        """Build the method for a compiled template; methods that initialise from the LM override this."""
        return cls(compiled.n_virtual, backend.hidden_size, config)

    def virtual_embeddings(self) -> torch.Tensor | None:
        """(n_virtual, H) embeddings for the virtual slots, or None when there are none."""
        return None

    def saved_info(self, compiled) -> dict:
        """Extra readable facts about a trained prompt, saved in the relation's config.json."""
        return {}


class FixedPrompt(PromptMethod):
    """Saved virtual-token embeddings, as reloaded from a run folder: evaluates exactly what was trained."""

    name = "fixed"

    def __init__(self, embeddings: torch.Tensor):
        super().__init__(embeddings.shape[0], embeddings.shape[1])
        self.register_buffer("embeddings", embeddings.float().clone())

    def virtual_embeddings(self) -> torch.Tensor:
        return self.embeddings
