"""The method settings as `probe train`'s flags, built from the registered methods (probe.methods.method_settings):
nothing in cli.py names a method's setting; and `--ray`'s optional address, read from the command line."""

from __future__ import annotations

import functools
import inspect
from typing import Annotated

import typer


def packable_methods() -> dict[bool, list[str]]:
    """The methods that can be fit, by whether their fits share passes of the LM (--pack)."""
    from probe.methods import METHODS

    return {p: [n for n, c in METHODS.items() if c.can_fit() and c.packable == p] for p in (True, False)}


def presets_help() -> str:
    """--preset's help: the presets the methods' fit configs declare."""
    from probe.methods import METHODS

    named = [f"{n}: {', '.join(getattr(c.fit_config_class, 'presets', {}))}" for n, c in METHODS.items()
             if getattr(c.fit_config_class, "presets", None)]
    return (f"A named set of the method's fit settings ({'; '.join(named)}; described in the README). Flags given "
            "override it.")


def with_settings(command):
    """The command with a flag for every method setting (--lr, --iterations, --init, ...: built from the methods' config
    classes, probe.methods.method_settings), listed after its own; the values given reach it as `settings`.
    `refresh()` builds the flags again (a method registered since)."""
    base = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in wrapper.setting_names}
        return command(**kwargs, settings={k: v for k, v in given.items() if v is not None})

    def refresh() -> None:
        from probe.methods import method_settings

        found = {name: s for name, s in method_settings().items() if name not in {p.name for p in base}}
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            s.kind | None, typer.Option(help=s.help(), **({"show_default": False, "metavar": ""} if s.kind is bool
                                                          else {}))]) for name, s in found.items()]
        wrapper.__signature__ = inspect.Signature(base + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in base + extra}
        wrapper.setting_names = set(found)

    wrapper.refresh = refresh
    refresh()
    return wrapper


def ray_address_default(argv: list[str]) -> list[str]:
    """`--ray` with no address means a local Ray: the next argument is its address only if it looks like one."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--ray" and (nxt is None or not (nxt in ("auto", "local") or ":" in nxt)):
            out.append("local")
    return out
