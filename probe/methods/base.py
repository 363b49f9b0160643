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
    """Turns a compiled template's virtual-token slots into input embeddings, or into per-layer keys and values.

    The evaluator and trainer call `virtual_embeddings()` and put its rows, in order, into the
    virtual-token positions of every input; a method without input vectors returns None. They also call
    `prefix()`: a prefix method returns the keys and values of the virtual positions at every layer.
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate when --lr is not given (chosen on dev)
    save_state: ClassVar[bool] = True  # save the method's own weights next to what evaluation uses
    default_shapes: ClassVar[dict[str, str] | None] = None  # per model kind, when not the P-tuning shapes

    def __init__(self, n_virtual: int, hidden_size: int, config: MethodConfig | None = None):
        super().__init__()
        self.n_virtual = n_virtual
        self.hidden_size = hidden_size
        self.config = config or self.config_class()

    @classmethod
    def check_template(cls, compiled) -> None:
        """Raise a ProbeError if the method cannot work with this compiled template (checked before any training)."""

    @classmethod
    def relation_template(cls, template, manual_template: str, kind: str, config: MethodConfig | None = None):
        """The template this method uses for a relation: by default the one chosen by --template (or the default)."""
        return template

    @classmethod
    def create(cls, backend, compiled, manual_template: str, config: MethodConfig | None = None) -> PromptMethod:
        """Build the method for a compiled template; methods that initialise from the LM override this."""
        return cls(compiled.n_virtual, backend.hidden_size, config)

    def virtual_embeddings(self) -> torch.Tensor | None:
        """(n_virtual, H) embeddings for the virtual slots, or None when there are none."""
        return None

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys (layers, n_virtual, key_dim) and values (layers, n_virtual, value_dim), or None."""
        return None

    def saved_info(self, compiled) -> dict:
        """Extra readable facts about a trained prompt, saved in the relation's config.json."""
        return {}


class FixedPrompt(PromptMethod):
    """A saved prompt, as reloaded from a run folder: evaluates exactly what was trained.

    It holds virtual-token embeddings, or per-layer prefix keys and values, or both.
    """

    name = "fixed"

    def __init__(self, embeddings: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                 values: torch.Tensor | None = None):
        n, h = embeddings.shape if embeddings is not None else (keys.shape[1], 0)
        super().__init__(n, h)
        self.register_buffer("embeddings", None if embeddings is None else embeddings.float().clone())
        self.register_buffer("keys", None if keys is None else keys.float().clone())
        self.register_buffer("values", None if values is None else values.float().clone())

    def virtual_embeddings(self) -> torch.Tensor | None:
        return self.embeddings

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.keys is None else (self.keys, self.values)
