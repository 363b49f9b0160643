"""Template files (one `KEY: TEMPLATE` per line) and template options: a file, or one inline template for all.

    default: (3, sub, 3, obj, 3)          # for every relation and model kind
    default.causal: (3, sub, 3, obj)      # for one model kind
    P19: (3, sub, "was born in", 2, obj)  # for one relation
    P37: (3, sub, manual, 3, obj, 3)      # with the relation's manual words
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from probe.errors import TemplateError
from probe.files import read_text
from probe.templates import DEFAULT_SHAPES, WORDS, Template, parse_template

GOOGLE_RE_TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "google_re.txt"  # LAMA's, shipped
_KEY = re.compile(r"^(default|[A-Za-z0-9_][\w\-]*)(\.(masked|causal))?$")  # default, or any relation name


@dataclass
class TemplateFile:
    """The templates of a file: a default per model kind and overrides per relation."""

    path: str
    entries: dict[str, Template]
    defaults: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SHAPES))  # when the file sets none

    def template_for(self, relation: str, kind: str) -> Template:
        for key in (f"{relation}.{kind}", relation, f"default.{kind}", "default"):
            if key in self.entries:
                return self.entries[key]
        return parse_template(self.defaults[kind])


def parse_template_file(path: str | Path) -> TemplateFile:
    """Read a template file; bad lines are a TemplateError naming the file and the first bad line, with every bad
    line in `problems`."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"template file {path} not found")
    entries: dict[str, Template] = {}
    problems = []
    for lineno, raw in enumerate(read_text(path, "template file", "'KEY: TEMPLATE' lines", error=TemplateError).splitlines(), 1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not _KEY.match(key):
            problems.append(f"{path}:{lineno}: expected 'KEY: TEMPLATE' with KEY default, default.masked, default.causal "
                            f"or a relation name like P19 or place_of_birth, got {line!r}")
        elif key in entries:
            problems.append(f"{path}:{lineno}: {key} is set twice")
        else:
            try:
                entries[key] = parse_template(value)
            except TemplateError as e:
                problems.append(f"{path}:{lineno}: {e}")
    if problems:
        more = f" (and {len(problems) - 1} more bad line{'s' * (len(problems) > 2)})" if len(problems) > 1 else ""
        raise TemplateError(problems[0] + more, problems)
    return TemplateFile(str(path), entries)


def template_sources(path: str | Path) -> dict[str, str]:
    """A template file's entries as their source text, by key."""
    return {key: t.source for key, t in parse_template_file(path).entries.items()}


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def read_template_spec(spec: str, defaults: dict[str, str] | None = None) -> TemplateFile:
    """A template option's value: a template file (a path, or a name ending .txt/.tpl), else one inline template
    that applies to every relation (`default`); `defaults` per model kind where the file sets none."""
    if Path(spec).is_file() or spec.endswith((".txt", ".tpl")):
        tf = parse_template_file(spec)
    else:
        tf = TemplateFile("<inline>", {"default": parse_template(spec)})
    if defaults:
        tf.defaults = dict(defaults)
    return tf


def relation_templates(spec: str | None) -> tuple[dict[str, str], str | None]:
    """Manual templates from --template (eval) or --manual-template (train): a template file keyed by relation
    (its `default` for the others), or one inline `[X] ... [Y]` template for every relation."""
    if spec is None:
        return {}, None
    entries = dict(read_template_spec(spec).entries)
    for key, t in entries.items():
        if t.n_virtual or any(p.kind == WORDS for p in t.parts):
            raise TemplateError(f"template {t.source!r} ({key}) has virtual tokens: a relation's template is real words, "
                                "'[X] ... [Y]' (train a shape with `probe train --template`)")
    default = entries.pop("default", None)
    return {k: t.source for k, t in entries.items()}, default.source if default else None
