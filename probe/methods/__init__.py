"""Prompt methods: a registry from name to class.

To add a method, write a module here with a `PromptMethod` subclass (and a config dataclass if it
has options), then register it in METHODS. The trainer and evaluator need nothing else.
"""

from __future__ import annotations

from probe.errors import ProbeError
from probe.methods.autoprompt import AutoPrompt
from probe.methods.base import FixedPrompt, MethodConfig, PromptMethod
from probe.methods.majority import MajorityClass
from probe.methods.manual import ManualPrompt
from probe.methods.prompt_tuning import PromptTuning
from probe.methods.ptuning import PTuningEncoder, PTuningMLP

METHODS: dict[str, type[PromptMethod]] = {
    m.name: m for m in (ManualPrompt, PTuningEncoder, PTuningMLP, PromptTuning, AutoPrompt, MajorityClass)
}


def get_method(name: str) -> type[PromptMethod]:
    """The method class for a name; an unknown name is a ProbeError listing the known ones."""
    if name not in METHODS:
        raise ProbeError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "FixedPrompt", "MethodConfig", "PromptMethod", "get_method"]
