"""Files of fixed discrete prompts (`[X] ... [Y]` text), one or many per relation. Knows nothing of models.

Accepted inputs:
- a JSONL file of {"relation", "template"} lines (AutoPrompt's prompts, LPAQA's top-1 list); a relation may repeat;
- a text file of `P19<TAB>template` or `P19: template` lines (`#` starts a comment line);
- a folder of P*.jsonl with {"template", "weight"} lines (LPAQA mine/, paraphrase/)
  or {"pattern", ...} lines (ParaRel), or of P*.txt with one template per line (LPAQA manual_paraphrase/).

Prompts of a relation keep the file order, except that prompts with weights are ranked by weight (highest first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from probe.data.records import read_jsonl
from probe.errors import TemplateError
from probe.templates import parse_template

_RELATION = re.compile(r"^P\d+$")
_TEXT_LINE = re.compile(r"^(P\d+)\s*(?:\t|:)\s*(.+)$")


@dataclass(frozen=True)
class DiscretePrompt:
    """One `[X] ... [Y]` prompt, its weight (None when the file gives none) and where it was read (file:line)."""

    template: str
    weight: float | None
    where: str


@dataclass
class PromptSet:
    """The prompts of a file or folder, per relation, best first."""

    path: Path
    format: str
    prompts: dict[str, list[DiscretePrompt]]

    def first_line(self, rid: str) -> str:
        return self.prompts[rid][0].where

    def chosen(self, relation_ids: list[str], max_prompts: int, strict: bool) -> dict[str, list[DiscretePrompt]]:
        """The first max_prompts prompts (0: all) of each relation; a relation without prompts is a ProbeError
        when strict, else left out."""
        missing = [rid for rid in relation_ids if rid not in self.prompts]
        if missing and strict:
            raise TemplateError(f"prompts file {self.path} has no prompt for {', '.join(missing)}")
        return {rid: self.prompts[rid][: max_prompts or None] for rid in relation_ids if rid in self.prompts}

    def check_relations(self, known: dict) -> None:
        """A relation id the data does not hold is a ProbeError naming the file and line."""
        for rid in self.prompts:
            if rid not in known:
                raise TemplateError(f"{self.first_line(rid)}: relation {rid} is not a T-REx relation of the data folder")


def _prompt(template: object, weight: object, where: str) -> DiscretePrompt:
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"{where}: expected a non-empty template string")
    template = template.strip()
    if template.count("[X]") != 1 or template.count("[Y]") != 1:
        raise TemplateError(f"{where}: template {template!r} must hold [X] and [Y] once each")
    try:
        parse_template(template)
    except TemplateError as e:
        raise TemplateError(f"{where}: {e}") from None
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0):
        raise TemplateError(f"{where}: expected a positive number for 'weight', got {weight!r}")
    return DiscretePrompt(template, None if weight is None else float(weight), where)


def _relation_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not _RELATION.match(value):
        raise TemplateError(f"{where}: expected a relation id like 'P19', got {value!r}")
    return value


def _read_relation_jsonl(path: Path) -> dict[str, list[DiscretePrompt]]:
    out: dict[str, list[DiscretePrompt]] = {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        rid = _relation_id(row.get("relation"), where)
        out.setdefault(rid, []).append(_prompt(row.get("template"), row.get("weight"), where))
    return out


def _read_relation_text(path: Path) -> dict[str, list[DiscretePrompt]]:
    out: dict[str, list[DiscretePrompt]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _TEXT_LINE.match(line.strip())
        if not m:
            raise TemplateError(f"{path}:{lineno}: expected 'P19<TAB>template' or 'P19: template', got {line.strip()!r}")
        out.setdefault(m.group(1), []).append(_prompt(m.group(2), None, f"{path}:{lineno}"))
    return out


def _read_folder(folder: Path) -> tuple[str, dict[str, list[DiscretePrompt]]]:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jsonl", ".txt") and _RELATION.match(p.stem))
    if not files:
        raise TemplateError(f"prompt folder {folder} holds no P*.jsonl or P*.txt files")
    if len({p.suffix for p in files}) > 1:
        raise TemplateError(f"prompt folder {folder} mixes P*.jsonl and P*.txt files: expected one kind")
    out: dict[str, list[DiscretePrompt]] = {}
    for path in files:
        if path.suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts = [_prompt(t, None, f"{path}:{i}") for i, t in enumerate(lines, 1) if t.strip()]
        else:
            prompts = [_prompt(row.get("template", row.get("pattern")), row.get("weight"), f"{path}:{i}")
                       for i, row in read_jsonl(path)]
        if prompts:
            out[path.stem] = prompts
    return ("folder of P*.txt" if files[0].suffix == ".txt" else "folder of P*.jsonl"), out


def read_prompts(path: str | Path) -> PromptSet:
    """Read a prompt file or folder; a bad line is a ProbeError with file and line number."""
    path = Path(path)
    if path.is_dir():
        fmt, prompts = _read_folder(path)
    elif path.is_file():
        fmt, prompts = ("jsonl", _read_relation_jsonl(path)) if path.suffix == ".jsonl" else ("text", _read_relation_text(path))
    else:
        raise TemplateError(f"prompts file {path} not found: expected a .jsonl file, a text file or a folder of P*.jsonl/P*.txt")
    if not prompts:
        raise TemplateError(f"prompts file {path} holds no prompts")
    for plist in prompts.values():
        if all(p.weight is not None for p in plist):
            plist.sort(key=lambda p: -p.weight)  # stable: equal weights keep the file order
    return PromptSet(path, fmt, dict(sorted(prompts.items(), key=lambda kv: int(kv[0][1:]))))
