"""Facts to probe: relations, facts per split, candidate vocabularies. Knows nothing of models.

Three sources behind one interface (`FactData`), opened by `open_data`:
- `LamaData`: a LAMA folder laid out like `shared/lama` (relations/relations.jsonl, trex/<split>/P*.jsonl, vocab/);
- `FactsFolder`: any folder `<name>/{train,dev,test}/<relation>.jsonl` with an optional `relations.jsonl`
  (what `probe data import` builds from LAMA's data.zip);
- `FactFiles`: JSONL or CSV files of one's own (`--facts`, `--train-facts`, `--dev-facts`);
- `BearData`: a folder in LM Pub Quiz's layout (BEAR: metadata_relations.json and P*.jsonl), every template kept.
A record is LAMA's (`sub_label`, `obj_label`; also `sub`/`obj`, `pred`, `masked_sentences`) or `subject`/`object`,
or names its fields with `--fields SUBJECT,OBJECT`.
To add a format: a module here with a `FactData` subclass, opened by `open_data`.
"""

from __future__ import annotations

from pathlib import Path

from probe.data.base import (
    DEFAULT_DATA_DIR,
    ENV_VAR,
    RELATION_TYPES,
    SPLITS,
    VOCABS,
    Fact,
    FactData,
    Relation,
    dedup,
    infer_type,
    read_word_list,
    relation_key,
    resolve_data_dir,
)
from probe.data.bear import BearData, BearRelation, bear_folder
from probe.data.facts import FactFiles, FactsFolder
from probe.data.lama import LamaData
from probe.data.records import json_record, read_jsonl, read_records, record_fact, record_relation
from probe.errors import DataError


def open_data(data: str | Path | None = None, facts: str | Path | dict | None = None, train_facts: str | Path | None = None,
              dev_facts: str | Path | None = None, fields: str | list | tuple | None = None, dev_split: float | None = None,
              seed: int = 13) -> FactData:
    """The facts asked for: facts files when any is given, else the folder `data` (or $PROBE_DATA, or data/lama),
    which is a LAMA folder or a facts folder."""
    if isinstance(fields, str):
        names = tuple(f.strip() for f in fields.split(","))
        if len(names) != 2 or not all(names):
            raise DataError(f"--fields {fields!r}: expected SUBJECT,OBJECT, the two field names, e.g. sub_label,obj_label")
        fields = names
    fields = tuple(fields) if fields else None
    if isinstance(facts, dict):  # a saved spec
        return FactFiles(facts.get("test"), facts.get("train"), facts.get("dev"), fields, dev_split, seed)
    if facts is not None or train_facts is not None or dev_facts is not None:
        if data is not None:
            raise DataError("give either --data (a folder) or facts files (--facts, --train-facts, --dev-facts), not both")
        return FactFiles(facts, train_facts, dev_facts, fields, dev_split, seed)
    if dev_split:
        raise DataError("--dev-split applies to --train-facts (facts files) only")
    root = resolve_data_dir(data)
    if bear_folder(root) is not None:
        if fields:
            raise DataError("--fields does not apply to a BEAR folder (its records are LM Pub Quiz's)")
        return BearData(root)
    if (root / "relations" / "relations.jsonl").exists() or (root / "trex").is_dir():
        if fields:
            raise DataError("--fields does not apply to a LAMA folder (its records are LAMA's)")
        return LamaData(root)
    if root.is_dir() and any((root / s).is_dir() for s in FactData.splits):
        return FactsFolder(root, fields)
    return LamaData(root)  # says what is missing


__all__ = ["DEFAULT_DATA_DIR", "BearData", "BearRelation", "bear_folder", "ENV_VAR",
           "RELATION_TYPES", "SPLITS", "VOCABS", "Fact", "FactData", "FactFiles", "FactsFolder",
           "LamaData", "Relation", "dedup", "infer_type", "json_record", "open_data", "read_jsonl", "read_records",
           "read_word_list", "record_fact", "record_relation", "relation_key", "resolve_data_dir"]
