"""Prompt methods: a registry from name to class.

To add a method, write a module here with a `PromptMethod` subclass (a `GradientPrompt` if the one trainer
fits it; else its own `fit(backend, task)` and fit config, as autoprompt.py has), a config dataclass whose user
options are made with `option(...)`, and register it in METHODS. The command line, sweep grids, `probe compare` and
the trainer read everything else from the class.
"""

from __future__ import annotations

import dataclasses

from probe.errors import ProbeError
from probe.methods.autoprompt import AutoPrompt
from probe.methods.base import FixedPrompt, MethodConfig, PromptMethod, option
from probe.methods.finetune import FineTune
from probe.methods.gradient import GradientPrompt
from probe.methods.manual import ManualPrompt
from probe.methods.prefix_tuning import PrefixTuning
from probe.methods.prompt_tuning import PromptTuning
from probe.methods.ptuning import PTuningEncoder, PTuningMLP

METHODS: dict[str, type[PromptMethod]] = {
    m.name: m for m in (ManualPrompt, PTuningEncoder, PTuningMLP, PromptTuning, PrefixTuning, AutoPrompt, FineTune)
}


def get_method(name: str) -> type[PromptMethod]:
    """The method class for a name; an unknown name is a ProbeError listing the known ones."""
    if name not in METHODS:
        raise ProbeError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def option_names() -> list[str]:
    """Every option some registered method takes, in the order methods are registered (init, reparam, ...)."""
    return list(dict.fromkeys(f.name for m in METHODS.values() for f in m.config_class.options()))


def method_config(name: str, **options) -> MethodConfig:
    """The config of method `name` with the options given (None: the default); an option it lacks is a ProbeError."""
    takes = {f.name: f for f in get_method(name).config_class.options()}
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in takes:
            named = ", ".join(f"--{f}" for f in takes) or "no options"
            raise ProbeError(f"--{key} does not apply to method {name!r} (it takes {named})")
    config = get_method(name).config_class(**{k: _typed(takes[k], v) for k, v in given.items()})
    config.check()
    return config


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """`--option NAME=VALUE` pairs (repeatable) as a dict; a malformed pair is a ProbeError."""
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ProbeError(f"--option {pair!r}: expected NAME=VALUE, e.g. --option init=template")
        out[name.strip().replace("-", "_")] = value.strip()
    return out


def _typed(field: dataclasses.Field, value):
    """An option's value as its field's type (given as text on the command line)."""
    if not isinstance(value, str) or isinstance(field.default, str):
        return value
    kind = type(field.default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        raise ProbeError(f"option {field.name} {value!r}: expected a {kind.__name__}") from None


def method_list() -> str:
    """The methods with their options, as the README and --help list them."""
    lines = []
    for name, cls in METHODS.items():
        opts = ", ".join(f"{f.name} ({'/'.join(map(str, f.metadata['choices'] or ()))}; default {f.default})"
                         for f in cls.config_class.options())
        lines.append(f"{name}: {cls.summary}" + (f" [options: {opts}]" if opts else ""))
    return "\n".join(lines)


__all__ = ["METHODS", "FixedPrompt", "GradientPrompt", "MethodConfig", "PromptMethod", "get_method", "method_config",
           "method_list", "option", "option_names", "parse_options"]
