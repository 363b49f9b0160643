"""The manual LAMA prompt (`[X] was born in [Y] .`): no virtual tokens, nothing trained."""

from __future__ import annotations

from probe.errors import TemplateError
from probe.methods.base import PromptMethod


class ManualPrompt(PromptMethod):
    """Evaluates the relation's manual template as it is."""

    name = "manual"
    summary = "the relation's manual template ([X] was born in [Y] .), evaluated as it is"
    reference = True  # what `probe compare` measures every other method against
    continuous = False  # its prompt is real words

    def __init__(self, n_virtual: int, hidden_size: int, config=None):
        if n_virtual:
            raise TemplateError("method 'manual' takes a template without virtual tokens")
        super().__init__(n_virtual, hidden_size, config)
