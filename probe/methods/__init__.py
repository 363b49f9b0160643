"""Prompt methods: a registry from name to class. Add a method by writing a module here and registering it."""

from __future__ import annotations

from probe.errors import ProbeError
from probe.methods.base import MethodConfig, PromptMethod
from probe.methods.manual import ManualPrompt

METHODS: dict[str, type[PromptMethod]] = {
    ManualPrompt.name: ManualPrompt,
}


def get_method(name: str) -> type[PromptMethod]:
    """The method class for a name; an unknown name is a ProbeError listing the known ones."""
    if name not in METHODS:
        raise ProbeError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "MethodConfig", "PromptMethod", "get_method"]
