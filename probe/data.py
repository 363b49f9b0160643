"""Reading a LAMA folder: relations, facts per split, vocabularies. Knows nothing of models."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from probe.errors import ProbeError

DEFAULT_DATA_DIR = Path("data/lama")
ENV_VAR = "PROBE_DATA"
SPLITS = {
    "train": "trex/train",
    "dev": "trex/dev",
    "test_34k": "trex/test_34k",
    "test_29k": "trex/test_29k",
}
SPLIT_ALIASES = {"test": "test_34k"}
VOCABS = {"common": "vocab/common_vocab_cased.txt", "29k": "vocab/ptuning_29k-vocab.json"}
RELATION_TYPES = ("1-1", "N-1", "N-M")


@dataclass(frozen=True)
class Relation:
    """One LAMA relation, with its manual template (`[X] was born in [Y] .`) and type (1-1, N-1, N-M)."""

    id: str
    label: str
    type: str
    template: str
    description: str = ""


@dataclass(frozen=True)
class Fact:
    """A (subject, object) pair of a relation."""

    sub: str
    obj: str


def resolve_data_dir(option: str | Path | None = None) -> Path:
    """The LAMA folder: the option if given, else $PROBE_DATA, else `data/lama`."""
    if option:
        return Path(option)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEFAULT_DATA_DIR


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a JSON-lines file; a malformed line is a ProbeError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProbeError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise ProbeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def _field(row: dict, key: str, path: Path, lineno: int) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ProbeError(f"{path}:{lineno}: expected a non-empty string field {key!r}")
    return value


class LamaData:
    """A LAMA folder laid out like `shared/lama`: relations, T-REx splits and vocabularies."""

    def __init__(self, root: str | Path | None = None):
        self.root = resolve_data_dir(root)
        if not self.root.is_dir():
            raise ProbeError(
                f"LAMA data folder {self.root} not found: pass --data DIR or set {ENV_VAR} "
                "to a folder holding relations/relations.jsonl and trex/"
            )
        for rel in ("relations/relations.jsonl", "trex/test_34k"):
            if not (self.root / rel).exists():
                raise ProbeError(f"LAMA data folder {self.root} is incomplete: {rel} is missing")

    @cached_property
    def all_relations(self) -> dict[str, Relation]:
        """Every relation in relations.jsonl, including the 5 that have no T-REx test facts."""
        path = self.root / "relations/relations.jsonl"
        out = {}
        for i, row in read_jsonl(path):
            rid = _field(row, "relation", path, i)
            out[rid] = Relation(
                id=rid,
                label=row.get("label", ""),
                type=row.get("type", ""),
                template=_field(row, "template", path, i),
                description=row.get("description", ""),
            )
        return out

    @cached_property
    def relations(self) -> dict[str, Relation]:
        """The T-REx relations: those with a test file (41 in LAMA), sorted by id number."""
        test_dir = self.root / SPLITS["test_34k"]
        ids = {p.stem for p in test_dir.glob("P*.jsonl")}
        rels = [r for rid, r in self.all_relations.items() if rid in ids]
        return {r.id: r for r in sorted(rels, key=lambda r: int(r.id[1:]))}

    def relation(self, rid: str) -> Relation:
        """One relation by id; an unknown id is a ProbeError listing what exists."""
        if rid not in self.relations:
            known = ", ".join(self.relations)
            raise ProbeError(f"unknown relation {rid!r}: expected one of the T-REx relations ({known})")
        return self.relations[rid]

    def facts(self, rid: str, split: str = "test_34k") -> list[Fact]:
        """The deduplicated (sub, obj) pairs of a relation in a split, in file order."""
        split = SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise ProbeError(f"unknown split {split!r}: expected one of {', '.join([*SPLITS, *SPLIT_ALIASES])}")
        self.relation(rid)
        path = self.root / SPLITS[split] / f"{rid}.jsonl"
        if not path.exists():
            return []
        seen: dict[tuple[str, str], None] = {}
        for i, row in read_jsonl(path):
            seen[(_field(row, "sub_label", path, i), _field(row, "obj_label", path, i))] = None
        return [Fact(sub, obj) for sub, obj in seen]

    def vocab_words(self, name: str = "common") -> list[str]:
        """Candidate words: `common` (LAMA common_vocab_cased) or `29k` (P-tuning's shared vocab)."""
        if name not in VOCABS:
            raise ProbeError(f"unknown vocab {name!r}: expected one of {', '.join(VOCABS)}")
        path = self.root / VOCABS[name]
        if not path.exists():
            raise ProbeError(f"LAMA data folder {self.root} is incomplete: {VOCABS[name]} is missing")
        if name == "29k":
            try:
                words = json.loads(path.read_text(encoding="utf-8"))["bert-base-cased"]
            except (json.JSONDecodeError, KeyError):
                raise ProbeError(f"{path}: expected a JSON object with a 'bert-base-cased' word list") from None
        else:
            words = [w for w in path.read_text(encoding="utf-8").split("\n") if w.strip()]
        return list(dict.fromkeys(w.strip() for w in words))

    def info_table(self):
        """One row per relation: id, label, type, manual template and facts per split (a pandas DataFrame)."""
        import pandas as pd

        rows = [{"relation": r.id, "label": r.label, "type": r.type, "template": r.template,
                 **{s: len(self.facts(r.id, s)) for s in SPLITS}} for r in self.relations.values()]
        return pd.DataFrame(rows, columns=["relation", "label", "type", "template", *SPLITS])
