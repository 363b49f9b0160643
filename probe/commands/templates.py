"""`probe templates check` and `probe templates show`; each prints through `echo` as it goes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from probe.errors import TemplateError


def check_template_file(file: Path, echo: Callable[[str], None], echo_err: Callable[[str], None]) -> None:
    """`probe templates check`: every entry of a template file, or every bad line (then one TemplateError)."""
    from probe.template_files import parse_template_file
    from probe.templates import WORDS

    try:
        tf = parse_template_file(file)
    except TemplateError as e:
        if len(e.problems) > 1:  # every bad line, then the one error line
            for problem in e.problems:
                echo_err(f"  {problem}")
            raise TemplateError(f"{file}: {len(e.problems)} lines are not valid templates (listed above)") from None
        raise
    for key, t in tf.entries.items():
        slots = sum(p.kind == WORDS for p in t.parts)
        echo(f"{key}: {t.source}  ({t.n_virtual} virtual tokens" + (f", {slots} word slots)" if slots else ")"))
    echo(f"{file}: {len(tf.entries)} templates, all valid")


def show_template(spec: str, model: str, relation: str, data: str | None, echo: Callable[[str], None]) -> None:
    """`probe templates show`: what the model sees for a relation's first test fact."""
    from probe.backends import load_backend
    from probe.data import open_data
    from probe.options import load_template_spec
    from probe.templates import compile_template

    tf = load_template_spec(spec)
    lama = open_data(data)
    rel = lama.relation(relation)
    backend = load_backend(model)
    template = tf.template_for(rel.id, backend.kind)
    compiled = compile_template(template, backend.tokenizer, backend.kind, manual=rel.template or None)
    facts = lama.facts(rel.id)
    sub = facts[0].sub if facts else "[X]"
    echo(f"{rel.id} ({rel.label}), {backend.kind} LM: {template.source}")
    echo(compiled.describe(sub))
