"""A fit, resolved: `FitSpec` is what one prompt's fit is (method, its options, its fit settings, templates,
fallback, seed), made by one function, `resolve_fit`, from `probe train`'s flags, a sweep grid's cell or `probe.train`'s
keywords. Every default is taken and every check made there, before any folder is made or any model loads; a sweep is
a list of them (one per setting and seed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from probe.errors import ProbeError
from probe.fit import config_fields
from probe.methods import MethodConfig, PromptMethod, get_method, method_config
from probe.options import load_template_spec
from probe.template_files import TemplateFile

FALLBACKS = ("manual",)  # what a prompt below the manual prompt on dev gives way to


def check_fallback(fallback: str | None) -> None:
    """--fallback is None or one of FALLBACKS."""
    if fallback is not None and fallback not in FALLBACKS:
        raise ProbeError(f"--fallback {fallback!r}: expected {' or '.join(FALLBACKS)} (the relation's manual prompt "
                         "where the trained one is below it on dev)")


@dataclass(frozen=True)
class FitSpec:
    """One fit, resolved and checked: the method, its options (`config`), its fit settings (`fit_config`), the
    templates it fits (--template, else the method's default shapes), the fallback, and the LM dtype it needs."""

    method: str
    config: MethodConfig
    fit_config: Any
    templates: TemplateFile
    fallback: str | None = None
    dtype: str | None = None  # the LM dtype the method needs (finetune: float32), else None: any

    @property
    def method_class(self) -> type[PromptMethod]:
        return get_method(self.method)

    @property
    def seed(self) -> int:
        return self.fit_config.seed


def fittable_method(name: str) -> type[PromptMethod]:
    """The class of a method that can be trained; one that cannot is a ProbeError."""
    method_cls = get_method(name)
    if not method_cls.can_fit():
        raise ProbeError(f"method {name!r} has nothing to train: use `probe eval --method {name}`")
    return method_cls


def resolve_fit(method: str | None, settings: Mapping[str, Any] | None = None, *, preset: str | None = None,
                template: str | None = None, template_given: bool | None = None, fallback: str | None = None,
                dtype: str | None = None) -> FitSpec:
    """The FitSpec of a method (default ptuning) with its settings by name (its options and its fit settings; None:
    the default), a --preset of fit settings, a --template, a --fallback and the LM's --dtype; any mistake is a
    ProbeError with the CLI's message. `template_given`: whether the template counts as given (a sweep's length
    axis does), else whether `template` is."""
    method = method or "ptuning"
    method_cls = fittable_method(method)
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    option_names = {f.name for f in method_cls.config_class.options()}
    fit_names = config_fields(method_cls.fit_config_class)
    extra = sorted(set(settings) - option_names - fit_names)
    if extra:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in extra)
        raise ProbeError(f"{flags} {'does' if len(extra) == 1 else 'do'} not apply to method {method!r}")
    config = method_config(method, **{k: v for k, v in settings.items() if k in option_names})
    method_cls.check_settings(config, template is not None if template_given is None else template_given)
    check_fallback(fallback)
    if method_cls.lm_dtype is not None and dtype not in (None, method_cls.lm_dtype):
        raise ProbeError(f"method {method!r} trains the LM's weights in {method_cls.lm_dtype}: --dtype {dtype} does "
                         "not apply")
    try:
        fit_config = method_cls.fit_config(preset, **{k: v for k, v in settings.items() if k in fit_names})
    except TypeError as e:  # a value of the wrong kind for a fit setting
        raise ProbeError(f"method {method!r}: {e}") from None
    return FitSpec(method, config, fit_config, load_template_spec(template, method), fallback, method_cls.lm_dtype)
