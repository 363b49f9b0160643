"""Facts of one's own: a facts folder (`<name>/{train,dev,test}/<relation>.jsonl`) or facts files (JSONL, CSV)."""

from __future__ import annotations

import random
from collections import defaultdict
from functools import cached_property
from pathlib import Path

from probe.data.base import RELATION_TYPES, Fact, FactData, Relation, dedup, infer_type, read_word_list, relation_key
from probe.data.records import field_of, read_jsonl, read_records, record_fact, record_relation
from probe.errors import DataError
from probe.files import distinct_folders, folder_name


class _RecordData(FactData):
    """Facts read from records, grouped by relation; relations described by an optional relations file."""

    @cached_property
    def records(self) -> dict[str, dict[str, list[Fact]]]:
        """split -> relation -> facts (deduplicated)."""
        raise NotImplementedError

    def described(self) -> dict[str, dict]:
        """Relation id -> its relations.jsonl row (label, type, template), where there is one."""
        return {}

    @cached_property
    def relations(self) -> dict[str, Relation]:
        described = self.described()
        ids = {rid for split in self.records.values() for rid in split}
        distinct_folders({rid: self.name for rid in sorted(ids)})
        out = {}
        for rid in sorted(ids, key=relation_key):
            row = described.get(rid, {})
            every = [f for split in self.records.values() for f in split.get(rid, [])]
            given = row.get("type") if row.get("type") in RELATION_TYPES else None
            out[rid] = Relation(rid, row.get("label", "") or rid, given or infer_type(every), row.get("template") or "",
                                row.get("description", ""), type_inferred=given is None)
        return out

    def _facts(self, rid: str, split: str) -> list[Fact]:
        return self.records.get(split, {}).get(rid, [])


def _grouped(path: Path, default: str, fields: tuple[str, str] | None) -> dict[str, list[Fact]]:
    """A file's facts by relation; two relations named apart in the file (LAMA's `pred` /a/born_in and /b/born_in)
    that would share one folder are refused, not merged."""
    groups: dict[str, list[Fact]] = defaultdict(list)
    source: dict[str, str] = {}
    for i, row in read_records(path):
        rid, raw = record_relation(row, default, f"{path}:{i}")
        if source.setdefault(rid, raw) != raw:
            raise DataError(f"{path}:{i}: relations {source[rid]!r} and {raw!r} would both be {rid!r}: expected "
                            "relations whose names differ in their last segment")
        groups[rid].append(record_fact(row, path, i, fields))
    return {rid: dedup(facts) for rid, facts in groups.items()}


class FactsFolder(_RecordData):
    """A folder `<name>/{train,dev,test}/<relation>.jsonl`, with an optional `relations.jsonl` and `vocab.txt`."""

    kind = "folder"

    def __init__(self, root: Path, fields: tuple[str, str] | None = None):
        self.root = Path(root)
        self.fields = fields
        if not any((self.root / s).is_dir() for s in self.splits):
            raise DataError(f"facts folder {self.root} has no train/, dev/ or test/ folder of <relation>.jsonl files")

    @property
    def name(self) -> str:
        return str(self.root.resolve())

    def spec(self) -> dict:
        return {"data": self.name, **({"fields": list(self.fields)} if self.fields else {})}

    def described(self) -> dict[str, dict]:
        path = self.root / "relations.jsonl"
        if not path.is_file():
            return {}
        return {folder_name(field_of(row, "relation", path, i), f"{path}:{i}"): row for i, row in read_jsonl(path)}

    @cached_property
    def records(self) -> dict[str, dict[str, list[Fact]]]:
        out = {}
        for split in self.splits:
            folder = self.root / split
            files = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.csv")) if folder.is_dir() else []
            out[split] = {}
            for path in files:
                facts = [f for group in _grouped(path, path.stem, self.fields).values() for f in group]
                out[split][folder_name(path.stem, str(path))] = dedup(facts)  # the file names the relation
        return out

    def vocab_words(self, name: str = "common") -> list[str]:
        if name == "common" and (self.root / "vocab.txt").is_file():
            return read_word_list(self.root / "vocab.txt")
        return super().vocab_words(name)


class FactFiles(_RecordData):
    """Facts files of one's own: `test` (what is evaluated), and for training `train` and `dev` (or a seeded share
    of train held out as dev). An optional `relation` field groups the rows; without it the file's stem names them."""

    kind = "files"

    def __init__(self, test: str | Path | None = None, train: str | Path | None = None, dev: str | Path | None = None,
                 fields: tuple[str, str] | None = None, dev_split: float | None = None, seed: int = 13):
        self.paths = {"test": test, "train": train, "dev": dev}
        self.fields = fields
        self.dev_split = dev_split
        self.seed = seed
        if dev is not None and dev_split:
            raise DataError("give either --dev-facts or --dev-split, not both")
        if dev_split is not None and not 0 < dev_split < 1:
            raise DataError(f"--dev-split must be a share between 0 and 1, got {dev_split}")
        if dev_split and train is None:
            raise DataError("--dev-split holds out a share of --train-facts: give --train-facts too")
        _ = self.records  # read now: a bad file fails before any model loads

    @property
    def name(self) -> str:
        return str(Path(next(p for p in self.paths.values() if p is not None)).resolve())

    def spec(self) -> dict:
        files = {k: str(Path(p).resolve()) for k, p in self.paths.items() if p is not None}
        return {"facts": files, "fields": list(self.fields) if self.fields else None, "dev_split": self.dev_split,
                "seed": self.seed}

    @cached_property
    def records(self) -> dict[str, dict[str, list[Fact]]]:
        out = {s: _grouped(Path(p), Path(p).stem, self.fields) if p is not None else {} for s, p in self.paths.items()}
        if self.dev_split:
            out["train"], out["dev"] = _hold_out(out["train"], self.dev_split, self.seed)
        return out


def _hold_out(train: dict[str, list[Fact]], share: float, seed: int) -> tuple[dict, dict]:
    """Per relation, a seeded `share` of the train facts (at least one, if there are two) as dev."""
    keep, held = {}, {}
    for rid, facts in train.items():
        order = list(range(len(facts)))
        random.Random(f"{seed}:{rid}").shuffle(order)
        n = min(len(facts) - 1, max(1, round(share * len(facts)))) if len(facts) > 1 else 0
        out = set(order[:n])
        keep[rid] = [f for i, f in enumerate(facts) if i not in out]
        held[rid] = [f for i, f in enumerate(facts) if i in out]
    return keep, held


