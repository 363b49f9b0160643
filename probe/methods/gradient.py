"""The base of the methods fit by gradient descent against the frozen LM (`probe.trainer`)."""

from __future__ import annotations

from collections.abc import Iterator

from probe.fit import FitResult, FitTask, Fitted
from probe.methods.base import PromptMethod
from probe.trainer import TrainConfig, train_pack, train_with_retries


class GradientPrompt(PromptMethod):
    """A method fit by the one trainer (`probe.trainer.train_prompt`): AdamW on its parameters, the LM frozen; run again
    at a lower lr when dev never rises above its start (`train_with_retries`). Several fits of such methods can share
    one pass of the LM (`probe.pack`)."""

    fit_config_class = TrainConfig
    packable = True

    def fit(self, backend, task: FitTask) -> FitResult:
        return train_with_retries(backend, self, task)

    @classmethod
    def fit_together(cls, backend, tasks: list[FitTask], slots: int) -> Iterator[tuple[int, Fitted]]:
        return train_pack(backend, tasks, slots)
