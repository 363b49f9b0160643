"""Facts to probe: relations, facts per split, candidate vocabularies. Knows nothing of models.

Three sources behind one interface (`FactData`), opened by `open_data`:
- `LamaData`: a LAMA folder laid out like `shared/lama` (relations/relations.jsonl, trex/<split>/P*.jsonl, vocab/);
- `FactsFolder`: any folder `<name>/{train,dev,test}/<relation>.jsonl` with an optional `relations.jsonl`
  (what `probe data import` builds from LAMA's data.zip);
- `FactFiles`: JSONL or CSV files of one's own (`--facts`, `--train-facts`, `--dev-facts`).
A record is LAMA's (`sub_label`, `obj_label`; also `sub`/`obj`, `pred`, `masked_sentences`) or `subject`/`object`,
or names its fields with `--fields SUBJECT,OBJECT`. To add a format, add a source here.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
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
SOURCES_HINT = ("LAMA comes from facebookresearch/LAMA's data.zip (build a folder with `probe data import data.zip --out DIR`); "
                "the T-REx train/dev splits from AutoPrompt / P-tuning")
SUBJECT_FIELDS = ("sub_label", "subject", "sub")
OBJECT_FIELDS = ("obj_label", "object", "obj")


@dataclass(frozen=True)
class Relation:
    """One relation, with its manual template (`[X] was born in [Y] .`) and type (1-1, N-1, N-M)."""

    id: str
    label: str
    type: str
    template: str
    description: str = ""
    type_inferred: bool = False  # the type was read off the facts, not given


@dataclass(frozen=True)
class Fact:
    """A (subject, object) pair of a relation; `sentence` is a cloze sentence holding [MASK], when the data has one."""

    sub: str
    obj: str
    sentence: str | None = field(default=None, compare=False)


def relation_key(rid: str) -> tuple:
    """Sort key of relation ids: P19 before P103, names alphabetically."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", rid) if p)


def resolve_data_dir(option: str | Path | None = None) -> Path:
    """The data folder: the option if given, else $PROBE_DATA, else `data/lama`."""
    if option:
        return Path(option)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEFAULT_DATA_DIR


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a JSON-lines file; a malformed line is a ProbeError naming file and line."""
    with open(path, encoding="utf-8") as f:
        rows = [(lineno, json_record(line, path, lineno)) for lineno, line in enumerate(f, 1)]
    return [(lineno, row) for lineno, row in rows if row is not None]


def json_record(line: str, where: str | Path, lineno: int) -> dict | None:
    """The JSON object on one line of a JSONL file (None for a blank line); anything else is a ProbeError naming
    `where` and the line."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ProbeError(f"{where}:{lineno}: malformed JSON line ({e.msg})") from None
    if not isinstance(row, dict):
        raise ProbeError(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL or CSV file (CSV: a header row names the fields)."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"facts file {path} not found: expected a JSONL or CSV file")
    expected = f"facts file {path}: expected JSONL (one JSON object a line) or CSV with a header row"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ProbeError(f"{expected}, as UTF-8 text") from None
    if not text.strip():
        raise ProbeError(f"facts file {path} is empty: expected a subject and an object per row")
    suffix = path.suffix.lower()
    if suffix != ".csv" and (suffix == ".jsonl" or text.lstrip().startswith("{")):
        rows = ((lineno, json_record(line, path, lineno)) for lineno, line in enumerate(text.split("\n"), 1))
        return [(lineno, row) for lineno, row in rows if row is not None]
    if suffix not in (".csv", ".tsv", ".txt"):
        raise ProbeError(expected)
    reader = csv.DictReader(text.splitlines(), dialect="excel-tab" if suffix == ".tsv" else "excel")
    return [(i, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader, 2)]


def _field(row: dict, key: str, path: Path, lineno: int) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ProbeError(f"{path}:{lineno}: expected a non-empty string field {key!r}")
    return value


def first_text(row: dict, *keys: str) -> str | None:
    """The first of `keys` that holds a non-blank string in a record, stripped; None if none does."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def record_fact(row: dict, path: Path, lineno: int, fields: tuple[str, str] | None = None) -> Fact:
    """The fact of one record: LAMA's fields, subject/object, or the `fields` named; its first cloze sentence."""
    sub = first_text(row, *(fields[:1] if fields else SUBJECT_FIELDS))
    obj = first_text(row, *(fields[1:] if fields else OBJECT_FIELDS))
    if sub is None or obj is None:
        names = f"{fields[0]} and {fields[1]}" if fields else "sub_label/subject and obj_label/object, or --fields"
        raise ProbeError(f"{path}:{lineno}: expected a subject and an object ({names})")
    sentences = row.get("masked_sentences")
    sentence = sentences[0] if isinstance(sentences, list) and sentences and isinstance(sentences[0], str) else None
    return Fact(sub, obj, sentence)


def record_relation(row: dict, default: str) -> str:
    """A record's relation: `relation`, else the last segment of LAMA's `pred` (/people/person/place_of_birth ->
    place_of_birth), else `predicate_id`, else `default`."""
    for key in ("relation", "pred", "predicate_id"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip().rstrip("/").rsplit("/", 1)[-1]
    return default


def infer_type(facts: list[Fact]) -> str:
    """1-1, N-1 or N-M from the facts: one object per subject, and one subject per object?"""
    objects, subjects = defaultdict(set), defaultdict(set)
    for f in facts:
        objects[f.sub].add(f.obj)
        subjects[f.obj].add(f.sub)
    if all(len(o) == 1 for o in objects.values()):
        return "1-1" if all(len(s) == 1 for s in subjects.values()) else "N-1"
    return "N-M"


def dedup(facts: list[Fact]) -> list[Fact]:
    """Distinct (sub, obj) pairs in order; the first record's sentence is kept."""
    seen: dict[tuple[str, str], Fact] = {}
    for f in facts:
        seen.setdefault((f.sub, f.obj), f)
    return list(seen.values())


def read_word_list(path: Path) -> list[str]:
    """One word a line (a vocabulary file of one's own)."""
    if not path.is_file():
        raise ProbeError(f"vocabulary file {path} not found: expected one candidate word a line")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
    if not words:
        raise ProbeError(f"vocabulary file {path} is empty: expected one candidate word a line")
    return list(dict.fromkeys(words))


class FactData:
    """Relations, their facts per split, and candidate vocabularies, wherever they come from."""

    splits: tuple[str, ...] = ("train", "dev", "test")
    aliases: dict[str, str] = {}
    test_split: str = "test"
    kind: str = "facts"
    relations_noun: str = "relations"

    @property
    def name(self) -> str:
        """What the run config records as `data`."""
        raise NotImplementedError

    def spec(self) -> dict:
        """How to open this data again (`open_data(**spec)`), saved with every run."""
        raise NotImplementedError

    @cached_property
    def relations(self) -> dict[str, Relation]:
        raise NotImplementedError

    def relation(self, rid: str) -> Relation:
        """One relation by id; an unknown id is a ProbeError listing what exists."""
        if rid not in self.relations:
            known = ", ".join(self.relations) or f"none: {self.name} holds no facts"
            raise ProbeError(f"unknown relation {rid!r}: expected one of the {self.relations_noun} ({known})")
        return self.relations[rid]

    def split_name(self, split: str | None) -> str:
        """A split as this data names it (`test` is `test_34k` in LAMA); an unknown one is a ProbeError."""
        split = split or self.test_split
        split = self.aliases.get(split, split)
        if split not in self.splits:
            raise ProbeError(f"unknown split {split!r}: expected one of {', '.join([*self.splits, *self.aliases])}")
        return split

    def facts(self, rid: str, split: str | None = None) -> list[Fact]:
        """The deduplicated facts of a relation in a split, in file order (none where the split has no file)."""
        split = self.split_name(split)
        self.relation(rid)
        return self._facts(rid, split)

    def _facts(self, rid: str, split: str) -> list[Fact]:
        raise NotImplementedError

    def vocab_words(self, name: str = "common") -> list[str]:
        """Candidate words: `common` (LAMA's common vocabulary), `29k` (P-tuning's), `objects` (every object of
        these facts), or a file of one's own (one word a line)."""
        if name == "objects":
            return list(dict.fromkeys(f.obj for r in self.relations for s in self.splits for f in self._facts(r, s)))
        if name in VOCABS:
            return lama_vocab(self.vocab_root(), name)
        if not Path(name).is_file():
            raise ProbeError(f"unknown vocab {name!r}: expected one of {', '.join(VOCABS)}, objects, or a file of one "
                             "candidate word a line")
        return read_word_list(Path(name))

    def vocab_root(self) -> Path:
        """The LAMA folder whose vocab/ holds `common` and `29k`: --data's, else $PROBE_DATA or data/lama."""
        return resolve_data_dir()

    def info_table(self):
        """One row per relation: id, label, type, manual template and facts per split (a pandas DataFrame)."""
        import pandas as pd

        rows = [{"relation": r.id, "label": r.label, "type": r.type + ("*" if r.type_inferred else ""),
                 "template": r.template, **{s: len(self._facts(r.id, s)) for s in self.splits}}
                for r in self.relations.values()]
        return pd.DataFrame(rows, columns=["relation", "label", "type", "template", *self.splits])

    def with_templates(self, templates: dict[str, str], default: str | None = None) -> FactData:
        """The same facts with these relations' manual templates (and `default` for any other)."""
        return _Retemplated(self, templates, default)

    @property
    def test_splits(self) -> tuple[str, ...]:
        """The splits a trained prompt may be tested on."""
        return tuple(s for s in self.splits if s.startswith("test"))


class _Retemplated(FactData):
    """Another source's facts, with manual templates given by the user."""

    def __init__(self, inner: FactData, templates: dict[str, str], default: str | None):
        self.inner, self.templates, self.default = inner, templates, default
        self.splits, self.aliases, self.test_split = inner.splits, inner.aliases, inner.test_split
        self.kind, self.relations_noun = inner.kind, inner.relations_noun

    @property
    def name(self) -> str:
        return self.inner.name

    def spec(self) -> dict:
        return self.inner.spec()

    @cached_property
    def relations(self) -> dict[str, Relation]:
        out = {}
        for rid, r in self.inner.relations.items():
            template = self.templates.get(rid, self.default) or r.template
            out[rid] = replace(r, template=template)
        return out

    def _facts(self, rid: str, split: str) -> list[Fact]:
        return self.inner._facts(rid, split)

    def vocab_root(self) -> Path:
        return self.inner.vocab_root()


def lama_vocab(root: Path, name: str) -> list[str]:
    """LAMA's `common` vocabulary or P-tuning's `29k` list, from a LAMA folder."""
    path = root / VOCABS[name]
    if not path.exists():
        raise ProbeError(f"vocabulary {name!r} is read from a LAMA folder, but {path} is missing: pass --vocab FILE "
                         "(one word a line), --vocab objects (the objects of the facts), or --data/$PROBE_DATA")
    if name == "29k":
        try:
            words = json.loads(path.read_text(encoding="utf-8"))["bert-base-cased"]
        except (json.JSONDecodeError, KeyError):
            raise ProbeError(f"{path}: expected a JSON object with a 'bert-base-cased' word list") from None
    else:
        words = [w for w in path.read_text(encoding="utf-8").split("\n") if w.strip()]
    return list(dict.fromkeys(w.strip() for w in words))


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
            raise ProbeError(
                f"data folder {self.root} not found: pass --data DIR or set {ENV_VAR} to a LAMA folder "
                f"(relations/relations.jsonl and trex/) or a facts folder (test/<relation>.jsonl); {SOURCES_HINT}"
            )
        for rel in ("relations/relations.jsonl", "trex/test_34k"):
            if not (self.root / rel).exists():
                raise ProbeError(f"LAMA data folder {self.root} is incomplete: {rel} is missing")

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
        ids = {p.stem for p in test_dir.glob("*.jsonl")}
        rels = [r for rid, r in self.all_relations.items() if rid in ids]
        return {r.id: r for r in sorted(rels, key=lambda r: relation_key(r.id))}

    def _facts(self, rid: str, split: str) -> list[Fact]:
        path = self.root / SPLITS[split] / f"{rid}.jsonl"
        if not path.exists():
            return []
        return dedup([Fact(_field(row, "sub_label", path, i), _field(row, "obj_label", path, i))
                      for i, row in read_jsonl(path)])


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
    groups: dict[str, list[Fact]] = defaultdict(list)
    for i, row in read_records(path):
        groups[record_relation(row, default)].append(record_fact(row, path, i, fields))
    return {rid: dedup(facts) for rid, facts in groups.items()}


class FactsFolder(_RecordData):
    """A folder `<name>/{train,dev,test}/<relation>.jsonl`, with an optional `relations.jsonl` and `vocab.txt`."""

    kind = "folder"

    def __init__(self, root: Path, fields: tuple[str, str] | None = None):
        self.root = Path(root)
        self.fields = fields
        if not any((self.root / s).is_dir() for s in self.splits):
            raise ProbeError(f"facts folder {self.root} has no train/, dev/ or test/ folder of <relation>.jsonl files")

    @property
    def name(self) -> str:
        return str(self.root.resolve())

    def spec(self) -> dict:
        return {"data": self.name, **({"fields": list(self.fields)} if self.fields else {})}

    def described(self) -> dict[str, dict]:
        path = self.root / "relations.jsonl"
        if not path.is_file():
            return {}
        return {_field(row, "relation", path, i): row for i, row in read_jsonl(path)}

    @cached_property
    def records(self) -> dict[str, dict[str, list[Fact]]]:
        out = {}
        for split in self.splits:
            folder = self.root / split
            files = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.csv")) if folder.is_dir() else []
            out[split] = {}
            for path in files:
                facts = [f for group in _grouped(path, path.stem, self.fields).values() for f in group]
                out[split][path.stem] = dedup(facts)  # the file names the relation
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
            raise ProbeError("give either --dev-facts or --dev-split, not both")
        if dev_split is not None and not 0 < dev_split < 1:
            raise ProbeError(f"--dev-split must be a share between 0 and 1, got {dev_split}")
        if dev_split and train is None:
            raise ProbeError("--dev-split holds out a share of --train-facts: give --train-facts too")
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


def open_data(data: str | Path | None = None, facts: str | Path | dict | None = None, train_facts: str | Path | None = None,
              dev_facts: str | Path | None = None, fields: str | list | tuple | None = None, dev_split: float | None = None,
              seed: int = 13) -> FactData:
    """The facts asked for: facts files when any is given, else the folder `data` (or $PROBE_DATA, or data/lama),
    which is a LAMA folder or a facts folder."""
    if isinstance(fields, str):
        names = tuple(f.strip() for f in fields.split(","))
        if len(names) != 2 or not all(names):
            raise ProbeError(f"--fields {fields!r}: expected SUBJECT,OBJECT, the two field names, e.g. sub_label,obj_label")
        fields = names
    fields = tuple(fields) if fields else None
    if isinstance(facts, dict):  # a saved spec
        return FactFiles(facts.get("test"), facts.get("train"), facts.get("dev"), fields, dev_split, seed)
    if facts is not None or train_facts is not None or dev_facts is not None:
        if data is not None:
            raise ProbeError("give either --data (a folder) or facts files (--facts, --train-facts, --dev-facts), not both")
        return FactFiles(facts, train_facts, dev_facts, fields, dev_split, seed)
    if dev_split:
        raise ProbeError("--dev-split applies to --train-facts (facts files) only")
    root = resolve_data_dir(data)
    if (root / "relations" / "relations.jsonl").exists() or (root / "trex").is_dir():
        if fields:
            raise ProbeError("--fields does not apply to a LAMA folder (its records are LAMA's)")
        return LamaData(root)
    if root.is_dir() and any((root / s).is_dir() for s in FactData.splits):
        return FactsFolder(root, fields)
    return LamaData(root)  # says what is missing
