"""Relations, facts and what every data source shares (`FactData`). Knows nothing of models."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from probe.errors import DataError
from probe.files import read_text

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
    answers: tuple[str, ...] = ()  # the relation's answer space, where the data names one (BEAR); else its objects

    def all_templates(self) -> tuple[str, ...]:
        """Every template the data gives the relation (BEAR has several); here its one manual template."""
        return (self.template,)


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
        raise DataError(f"vocabulary file {path} not found: expected one candidate word a line")
    words = [w.strip() for w in read_text(path, "vocabulary file", "one candidate word a line").splitlines() if w.strip()]
    if not words:
        raise DataError(f"vocabulary file {path} is empty: expected one candidate word a line")
    return list(dict.fromkeys(words))


def lama_vocab(root: Path, name: str) -> list[str]:
    """LAMA's `common` vocabulary or P-tuning's `29k` list, from a LAMA folder."""
    path = root / VOCABS[name]
    if not path.exists():
        raise DataError(f"vocabulary {name!r} is read from a LAMA folder, but {path} is missing: pass --vocab FILE "
                        "(one word a line), --vocab objects (the objects of the facts), or --data/$PROBE_DATA")
    if name == "29k":
        try:
            words = json.loads(read_text(path, "vocabulary file", "a JSON object"))["bert-base-cased"]
        except (json.JSONDecodeError, KeyError):
            raise DataError(f"{path}: expected a JSON object with a 'bert-base-cased' word list") from None
    else:
        words = [w for w in read_text(path, "vocabulary file", "one word a line").split("\n") if w.strip()]
    return list(dict.fromkeys(w.strip() for w in words))


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
            raise DataError(f"unknown relation {rid!r}: expected one of the {self.relations_noun} ({known})")
        return self.relations[rid]

    def split_name(self, split: str | None) -> str:
        """A split as this data names it (`test` is `test_34k` in LAMA); an unknown one is a ProbeError."""
        split = split or self.test_split
        split = self.aliases.get(split, split)
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}: expected one of {', '.join([*self.splits, *self.aliases])}")
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
            raise DataError(f"unknown vocab {name!r}: expected one of {', '.join(VOCABS)}, objects, or a file of one "
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

    def overlap(self, ids: list[str], split: str) -> dict[str, dict[str, int]]:
        """Per relation with any, how many of its `split` facts are also train facts, dev facts, and either (`shared`)."""
        out = {}
        for rid in ids:
            test = {(f.sub, f.obj) for f in self._facts(rid, split)}
            seen = {s: test & {(f.sub, f.obj) for f in self._facts(rid, s)} for s in ("train", "dev")
                    if s in self.splits and s != split}
            shared = set().union(*seen.values())
            if shared:
                out[rid] = {"test": len(test), **{s: len(v) for s, v in seen.items() if v}, "shared": len(shared)}
        return out

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


