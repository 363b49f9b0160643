"""A folder in LM Pub Quiz's layout (BEAR): `metadata_relations.json` (each relation's templates and answer space)
and `P*.jsonl` (sub_label, obj_label, answer_idx), with `relation_info.json` (domains) beside it or one folder up."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from probe.data.base import Fact, FactData, Relation, relation_key
from probe.data.records import read_jsonl
from probe.errors import DataError
from probe.files import read_text

METADATA = "metadata_relations.json"
RELATION_INFO = "relation_info.json"


@dataclass(frozen=True)
class BearRelation(Relation):
    """A relation with all its templates (`template` is the first) and its domains; `answers` is its answer space."""

    templates: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()

    def all_templates(self) -> tuple[str, ...]:
        return self.templates or (self.template,)


def bear_folder(root: Path) -> Path | None:
    """The folder holding metadata_relations.json: `root` itself or its BEAR/ subfolder; None: not this layout."""
    for folder in (root, root / "BEAR"):
        if (folder / METADATA).is_file():
            return folder
    return None


class BearData(FactData):
    """LM Pub Quiz's layout: one split (`test`), each relation's templates and typed answer space kept whole."""

    splits = ("test",)
    test_split = "test"
    kind = "bear"
    relations_noun = "BEAR relations"

    def __init__(self, root: str | Path):
        given = Path(root)
        folder = bear_folder(given)
        if folder is None:
            raise DataError(f"{given}: expected LM Pub Quiz's layout ({METADATA} and P*.jsonl, here or in BEAR/)")
        self.root, self.given = folder, given

    @property
    def name(self) -> str:
        return str(self.given.resolve())

    def spec(self) -> dict:
        return {"data": self.name}

    @cached_property
    def metadata(self) -> dict:
        path = self.root / METADATA
        try:
            meta = json.loads(read_text(path, "BEAR metadata", "a JSON object of relations"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg})") from None
        if not isinstance(meta, dict):
            raise DataError(f"{path}: expected a JSON object of relations")
        return meta

    @cached_property
    def domains(self) -> dict[str, list[str]]:
        """Each relation's domains from relation_info.json (beside the relations or one folder up), if there is one."""
        for path in (self.root / RELATION_INFO, self.root.parent / RELATION_INFO):
            if path.is_file():
                try:
                    info = json.loads(read_text(path, "relation info", "a JSON object of relations"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: malformed JSON ({e.msg})") from None
                return {rid: list(v.get("domains", [])) for rid, v in info.items() if isinstance(v, dict)}
        return {}

    @cached_property
    def relations(self) -> dict[str, BearRelation]:
        """The relations that have both metadata and an instances file, sorted by id number."""
        path = self.root / METADATA
        out = {}
        for rid in sorted((p.stem for p in self.root.glob("*.jsonl")), key=relation_key):
            meta = self.metadata.get(rid)
            if meta is None:
                continue
            templates, labels = meta.get("templates"), meta.get("answer_space_labels")
            if (not isinstance(templates, list) or not templates
                    or not all(isinstance(t, str) and t.count("[X]") == 1 and t.count("[Y]") == 1 for t in templates)):
                raise DataError(f"{path}: relation {rid} needs 'templates', a list of strings with one [X] and one [Y]")
            if not isinstance(labels, list) or not labels or not all(isinstance(a, str) for a in labels):
                raise DataError(f"{path}: relation {rid} needs 'answer_space_labels', a list of strings")
            out[rid] = BearRelation(id=rid, label=meta.get("label", ""), type=meta.get("type", ""), template=templates[0],
                                    templates=tuple(templates), answers=tuple(labels),
                                    domains=tuple(self.domains.get(rid, ())))
        return out

    def _facts(self, rid: str, split: str) -> list[Fact]:
        """Every instance in file order (LM Pub Quiz asks each), its object the answer at `answer_idx`."""
        answers = self.relations[rid].answers
        path = self.root / f"{rid}.jsonl"
        facts = []
        for i, row in read_jsonl(path):
            sub, idx = row.get("sub_label"), row.get("answer_idx")
            if not isinstance(sub, str) or not isinstance(idx, int) or not 0 <= idx < len(answers):
                raise DataError(f"{path}:{i}: expected 'sub_label' (a string) and 'answer_idx' (an index into the "
                                f"relation's {len(answers)} answers)")
            facts.append(Fact(sub, answers[idx]))
        return facts

    def vocab_words(self, name: str = "common") -> list[str]:
        if name == "objects":
            return list(dict.fromkeys(a for r in self.relations.values() for a in r.answers))
        return super().vocab_words(name)
