"""A LAMA folder laid out like `shared/lama`: relations/relations.jsonl, trex/<split>/P*.jsonl, vocab/."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from probe.data.base import (
    ENV_VAR,
    SOURCES_HINT,
    SPLIT_ALIASES,
    SPLITS,
    Fact,
    FactData,
    Relation,
    dedup,
    relation_key,
    resolve_data_dir,
)
from probe.data.records import field_of, read_jsonl
from probe.errors import DataError
from probe.files import distinct_folders, folder_name


class LamaData(FactData):
    """A LAMA folder laid out like `shared/lama`: relations, T-REx splits and vocabularies."""

    splits = tuple(SPLITS)
    aliases = SPLIT_ALIASES
    test_split = "test_34k"
    kind = "lama"
    relations_noun = "T-REx relations"

    def __init__(self, root: str | Path | None = None):
        self.root = resolve_data_dir(root)
        if not self.root.is_dir():
            raise DataError(
                f"data folder {self.root} not found: pass --data DIR or set {ENV_VAR} to a LAMA folder "
                f"(relations/relations.jsonl and trex/) or a facts folder (test/<relation>.jsonl); {SOURCES_HINT}"
            )
        for rel in ("relations/relations.jsonl", "trex/test_34k"):
            if not (self.root / rel).exists():
                raise DataError(f"LAMA data folder {self.root} is incomplete: {rel} is missing")

    @property
    def name(self) -> str:
        return str(self.root.resolve())

    def spec(self) -> dict:
        return {"data": self.name}

    def vocab_root(self) -> Path:
        return self.root

    @cached_property
    def all_relations(self) -> dict[str, Relation]:
        """Every relation in relations.jsonl, including the 5 that have no T-REx test facts."""
        path = self.root / "relations/relations.jsonl"
        out = {}
        for i, row in read_jsonl(path):
            rid = folder_name(field_of(row, "relation", path, i), f"{path}:{i}")
            out[rid] = Relation(
                id=rid,
                label=row.get("label", ""),
                type=row.get("type", ""),
                template=field_of(row, "template", path, i),
                description=row.get("description", ""),
            )
        return out

    @cached_property
    def relations(self) -> dict[str, Relation]:
        """The T-REx relations: those with a test file (41 in LAMA), sorted by id number."""
        test_dir = self.root / SPLITS["test_34k"]
        ids = {folder_name(p.stem, str(p)) for p in test_dir.glob("*.jsonl")}
        distinct_folders({rid: str(test_dir) for rid in sorted(ids)})
        rels = [r for rid, r in self.all_relations.items() if rid in ids]
        return {r.id: r for r in sorted(rels, key=lambda r: relation_key(r.id))}

    def _facts(self, rid: str, split: str) -> list[Fact]:
        path = self.root / SPLITS[split] / f"{rid}.jsonl"
        if not path.exists():
            return []
        return dedup([Fact(field_of(row, "sub_label", path, i), field_of(row, "obj_label", path, i))
                      for i, row in read_jsonl(path)])


