"""Fine-tuning: the ceiling the prompt methods are measured against. Every LM weight trains, on the manual
template, with the one trainer: the same loss, facts, dev selection and retries as the prompt methods.

The LM is shared by the relations of a run, so `release()` puts its weights back once a relation is tested.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from probe.errors import ModelError, SettingError, TemplateError
from probe.methods.gradient import GradientPrompt
from probe.templates import parse_template


class FineTune(GradientPrompt):
    """The manual prompt, with the LM's own weights as the trained parameters."""

    name = "finetune"
    summary = "every LM weight trains, on the manual template: the ceiling the frozen-LM methods are read against"
    continuous = False  # no learned vectors to read
    save_state = False  # the weights go to model.safetensors, and only with --save-model
    trains_lm: ClassVar[bool] = True
    lm_dtype = "float32"  # AdamW on the weights themselves: float32 master weights
    packable = False  # one LM per fit
    beside_others = False  # it trains the LM's weights
    default_lr = 3e-5  # chosen on dev among 1e-5, 3e-5 and 1e-4 (BENCHMARKS.md)

    def __init__(self, lm: nn.Module, hidden_size: int, config=None):
        super().__init__(0, hidden_size, config)
        self.lm = lm  # a submodule: its weights are this method's parameters and state
        self._original = {k: v.detach().clone() for k, v in lm.state_dict().items()}
        lm.requires_grad_(True)

    @classmethod
    def check_settings(cls, config, template_given: bool) -> None:
        if template_given:
            raise SettingError("finetune trains the LM on each relation's manual template: drop --template")

    @classmethod
    def check_template(cls, compiled) -> None:
        if compiled.n_virtual:
            raise TemplateError(f"template {compiled.template.source!r}: finetune takes the manual template, without "
                                "virtual tokens")

    @classmethod
    def relation_template(cls, template, manual_template: str, kind: str, config=None):
        return parse_template(manual_template)

    @classmethod
    def create(cls, backend, compiled, manual_template: str, config=None) -> FineTune:
        if backend.dtype != torch.float32:
            raise ModelError(f"finetune trains the LM's weights, which need float32 (the LM is {backend.dtype}): "
                             "load it with --dtype float32")
        return cls(backend.model, backend.hidden_size, config)

    def lm_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.lm.state_dict().items()}  # tied weights, saved apart

    def release(self) -> None:
        """Put the LM's weights back as they were before training, frozen again."""
        with torch.no_grad():
            self.lm.load_state_dict(self._original)
        for p in self.lm.parameters():
            p.grad = None
        self.lm.requires_grad_(False)
        self.lm.eval()

    def saved_info(self, compiled) -> dict:
        return {"trained_weights": sum(p.numel() for p in self.lm.parameters())}
