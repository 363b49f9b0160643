"""The one interface every prompt method implements, and how a method declares its options.

A method's options are the fields of its `config_class` made with `option(...)`: they are what `--init`,
`--reparam` and `--option NAME=VALUE` set, what a sweep grid's axes may vary, and what `probe compare` names in a
run's label when they differ from the default. Nothing outside a method's own module lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from probe.backends import PromptInputs
from probe.errors import SettingError, TemplateError
from probe.fit import FitResult, FitTask, Fitted, config_fields


def option(default: Any, choices: tuple | None = None, help: str = "") -> Any:
    """A method option: a config field that users set (`--init`, `--option`, a sweep axis), checked against `choices`."""
    return field(default=default, metadata={"option": True, "choices": choices, "help": help})


@dataclass
class MethodConfig:
    """A method's settings; the fields made with `option(...)` are its user options (see `options()`)."""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The user options among the fields, in declaration order."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("option")]

    def check(self) -> None:
        """A value outside an option's choices is a ProbeError naming the option and the choices."""
        for f in self.options():
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise SettingError(f"unknown {f.name} {value!r}: expected one of {', '.join(map(str, choices))}")

    def values(self) -> dict[str, Any]:
        """The options' values, by name."""
        return {f.name: getattr(self, f.name) for f in self.options()}


class PromptMethod(nn.Module):
    """Turns a compiled template's virtual-token slots into input embeddings, or into per-layer keys and values.

    The evaluator and trainer hand `prompt_inputs()` to the backend: `virtual_embeddings()`, whose rows go in
    order into the virtual positions of every input (None without input vectors), and `prefix()`, the keys and
    values of the virtual positions at every layer (prefix-tuning; None for the others).
    A method that can be fit names its fit settings (`fit_config_class`) and implements `fit(backend, task)`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for the method list (README, --help)
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    fit_config_class: ClassVar[type | None] = None  # None: nothing to fit
    reference: ClassVar[bool] = False  # the baseline `probe compare` measures the others against (the manual prompt)
    continuous: ClassVar[bool] = True  # learns vectors (not real tokens): `probe explain` can read them
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate when --lr is not given (chosen on dev)
    save_state: ClassVar[bool] = True  # save the method's own weights next to what evaluation uses
    default_shapes: ClassVar[dict[str, str] | None] = None  # per model kind, when not the P-tuning shapes
    trains_lm: ClassVar[bool] = False  # the LM's own weights train (put back by release(), --save-model)
    lm_dtype: ClassVar[str | None] = None  # the LM dtype the method needs (finetune: float32 master weights), else any
    packable: ClassVar[bool] = False  # several of its fits can share passes of the LM (fit_together, probe/pack.py)
    beside_others: ClassVar[bool] = True  # its fits leave the LM as it is, so others may run beside them (--jobs)

    def __init__(self, n_virtual: int, hidden_size: int, config: MethodConfig | None = None):
        super().__init__()
        self.n_virtual = n_virtual
        self.hidden_size = hidden_size
        self.config = config or self.config_class()

    @classmethod
    def can_fit(cls) -> bool:
        return cls.fit_config_class is not None

    @classmethod
    def fit_config(cls, preset: str | None = None, **options) -> object:
        """The fit settings from options (None: the default), checked; the learning rate defaults to the method's. A
        `preset` names a set of settings the fit config declares (`presets`); options given override it."""
        defaults = {"lr": cls.default_lr} if "lr" in config_fields(cls.fit_config_class) else {}
        presets = getattr(cls.fit_config_class, "presets", {})
        if preset is not None:
            if preset not in presets:
                known = f"one of {', '.join(presets)}" if presets else "none: it has no presets"
                raise SettingError(f"--preset {preset!r} does not exist for method {cls.name!r} (expected {known})")
            defaults.update(presets[preset])
        config = cls.fit_config_class(**{**defaults, **{k: v for k, v in options.items() if v is not None}})
        config.check()
        return config

    @classmethod
    def check_settings(cls, config: MethodConfig, template_given: bool) -> None:
        """Raise a ProbeError for settings that do not go together (checked before any model loads)."""

    @classmethod
    def check_template(cls, compiled) -> None:
        """Raise a ProbeError if the method cannot work with this compiled template (checked before any training)."""
        if cls.can_fit() and compiled.n_virtual == 0:
            raise TemplateError(f"template {compiled.template.source!r} has no virtual tokens: method {cls.name!r} needs some")

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
        """Prefix-tuning's keys (layers, n_virtual, key_dim) and values (layers, n_virtual, value_dim), or None."""
        return None

    def prompt_inputs(self) -> PromptInputs:
        """What the backend puts into the LM for this prompt."""
        return PromptInputs(self.virtual_embeddings(), self.prefix())

    def fit(self, backend, task: FitTask) -> FitResult:
        """Fit the prompt on the task's train facts, selecting on its dev facts; leaves the best-on-dev prompt."""
        raise SettingError(f"method {self.name!r} has nothing to train: use `probe eval --method {self.name}`")

    @classmethod
    def fit_together(cls, backend, tasks: list[FitTask], slots: int) -> Iterator[tuple[int, Fitted]]:
        """A packable method's fits of `tasks`, at most `slots` at once sharing passes of the LM (`probe.pack`); yields
        (index of the task, its Fitted) as each ends."""
        raise NotImplementedError(f"method {cls.name!r} is packable but has no fit_together")

    def saved_info(self, compiled) -> dict:
        """Extra readable facts about a trained prompt, saved in the relation's config.json."""
        return {}

    def lm_state(self) -> dict[str, torch.Tensor] | None:
        """The LM weights this method trained (methods that train the LM), for --save-model."""
        return None

    def release(self) -> None:
        """Undo what the method did to the shared LM, once its relation is tested (nothing for a prompt)."""


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
