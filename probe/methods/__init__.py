"""Prompt methods: a registry from name to class.

To add a method, write a module here with a `PromptMethod` subclass (a `GradientPrompt` if the one trainer
fits it; else its own `fit` and fit config, as autoprompt.py has), and a config dataclass if it has options;
then register it in METHODS. The pipeline, trainer and evaluator need nothing else.
"""

from __future__ import annotations

from probe.errors import ProbeError
from probe.methods.autoprompt import AutoPrompt
from probe.methods.base import FixedPrompt, GradientPrompt, MethodConfig, PromptMethod
from probe.methods.finetune import FineTune
from probe.methods.manual import ManualPrompt
from probe.methods.prefix_tuning import PrefixTuning
from probe.methods.prompt_tuning import PromptTuning
from probe.methods.ptuning import PTuningEncoder, PTuningMLP
from probe.train import config_fields

METHODS: dict[str, type[PromptMethod]] = {
    m.name: m for m in (ManualPrompt, PTuningEncoder, PTuningMLP, PromptTuning, PrefixTuning, AutoPrompt, FineTune)
}


def get_method(name: str) -> type[PromptMethod]:
    """The method class for a name; an unknown name is a ProbeError listing the known ones."""
    if name not in METHODS:
        raise ProbeError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, **options) -> MethodConfig:
    """The config of method `name` with the options given (None: the default); an option it lacks is a ProbeError."""
    fields = config_fields(get_method(name).config_class)
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in fields:
            takes = ", ".join(f"--{f}" for f in sorted(fields) if f in options) or "none of them"
            raise ProbeError(f"--{key} does not apply to method {name!r} (it takes {takes})")
    config = get_method(name).config_class(**given)
    if hasattr(config, "check"):
        config.check()
    return config


__all__ = ["METHODS", "FixedPrompt", "GradientPrompt", "MethodConfig", "PromptMethod", "get_method",
           "method_config"]
