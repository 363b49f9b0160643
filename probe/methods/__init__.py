"""Prompt methods: a registry from name to class.

To add a method, write a module here with a `PromptMethod` subclass (a `GradientPrompt` if the one trainer
fits it; else its own `fit(backend, task)` and fit config, as autoprompt.py has), a config dataclass whose user
options are made with `option(...)`, and register it in METHODS. The command line, sweep grids, `probe compare` and
the trainer read everything else from the class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from probe.errors import SettingError
from probe.fit import settings_of
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
        raise SettingError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
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
            raise SettingError(f"--{key} does not apply to method {name!r} (it takes {named})")
    config = get_method(name).config_class(**{k: _typed(takes[k], v) for k, v in given.items()})
    config.check()
    return config


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """`--option NAME=VALUE` pairs (repeatable) as a dict; a malformed pair is a ProbeError."""
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SettingError(f"--option {pair!r}: expected NAME=VALUE, e.g. --option init=template")
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
        raise SettingError(f"option {field.name} {value!r}: expected a {kind.__name__}") from None


@dataclass(frozen=True)
class Setting:
    """A setting some methods take, by name: a method option (`option(...)` in its config class) or a fit setting
    (`setting(...)` in its fit config class). The CLI's flags, a sweep grid's keys and `probe.train`'s keywords are
    built from these; nothing else names them."""

    name: str
    kind: type  # bool, int, float or str
    fit: bool  # a fit setting (else a method option)
    declared: tuple[tuple[str, str, Any], ...]  # (method, its help, its default), in the methods' order

    @property
    def methods(self) -> list[str]:
        return [m for m, _, _ in self.declared]

    def help(self) -> str:
        """One help text: what it is for each method (grouped), with the defaults."""
        fittable = [n for n, c in METHODS.items() if c.can_fit()]
        groups: dict[str, list[tuple[str, Any]]] = {}
        for method, text, default in self.declared:
            groups.setdefault(text, []).append((method, default))
        parts = []
        for text, members in groups.items():
            defaults: dict[str, list[str]] = {}
            for method, default in members:
                defaults.setdefault(str(default), []).append(method)
            if len(defaults) == 1:
                shown = f"default {next(iter(defaults))}"
            else:
                shown = "default " + "; ".join(f"{d} for {', '.join(ms)}" for d, ms in defaults.items())
            who = "" if [m for m, _ in members] == fittable else f"{', '.join(m for m, _ in members)}: "
            parts.append(f"{who}{text} ({shown})")
        return "; ".join(parts) + "."


def method_settings() -> dict[str, Setting]:
    """Every setting of every registered method, by name, in the order the methods declare them."""
    found: dict[str, tuple[type, bool, list]] = {}
    for cls in METHODS.values():
        declared = [(f, False, f.default) for f in cls.config_class.options()]
        if cls.fit_config_class is not None:
            declared += [(f, True, cls.default_lr if f.name == "lr" else f.default) for f in settings_of(cls.fit_config_class)]
        for f, fit, default in declared:
            found.setdefault(f.name, (type(f.default), fit, []))[2].append((cls.name, f.metadata.get("help", ""), default))
    return {name: Setting(name, kind, fit, tuple(declared)) for name, (kind, fit, declared) in found.items()}


def method_list() -> str:
    """The methods with their options, as the README and --help list them."""
    lines = []
    for name, cls in METHODS.items():
        opts = ", ".join(f"{f.name} ({'/'.join(map(str, f.metadata['choices'] or ()))}; default {f.default})"
                         for f in cls.config_class.options())
        lines.append(f"{name}: {cls.summary}" + (f" [options: {opts}]" if opts else ""))
    return "\n".join(lines)


__all__ = ["METHODS", "FixedPrompt", "GradientPrompt", "MethodConfig", "PromptMethod", "Setting", "get_method",
           "method_config", "method_list", "method_settings", "option", "option_names", "parse_options"]
