"""Import LAMA's `data.zip` (or its unpacked folder) into probe's facts-folder layout, one folder per corpus.

    SOURCE/[data/]relations.jsonl                  T-REx relations: id, manual template, label, type
    SOURCE/[data/]TREx/P19.jsonl                   T-REx facts of one relation
    SOURCE/[data/]Google_RE/*_test.jsonl           Google-RE facts; the relation is the last segment of `pred`
    SOURCE/[data/]ConceptNet/test.jsonl            ConceptNet cloze sentences; the relation is `pred`
    SOURCE/[data/]Squad/test.jsonl                 SQuAD cloze sentences; one relation, `squad`

becomes

    OUT/<corpus>/relations.jsonl                   {"relation", "template", "label", "type"} a line (cloze-only corpora: no template)
    OUT/<corpus>/test/<relation>.jsonl             the source records of the relation, unchanged, in source order
    OUT/trex/{train,dev}/P19.jsonl                 with `train_dev` (AutoPrompt's `P19/{train,dev}.jsonl` folders)

for corpus in trex, google_re, conceptnet, squad. Each corpus is written into a hidden temporary folder
beside its final place and renamed there once every corpus is complete, so an interrupted or refused
import leaves no corpus folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm import tqdm

from probe.data.records import first_text, json_record
from probe.errors import DataError, ProbeError, RunFolderError
from probe.files import bounded_lines, folder_mode, folder_name
from probe.template_files import GOOGLE_RE_TEMPLATES, template_sources

CORPORA = ("trex", "google_re", "conceptnet", "squad")
SOURCE_FOLDERS = {"trex": "TREx", "google_re": "Google_RE", "conceptnet": "ConceptNet", "squad": "Squad"}
SPLITS = ("train", "dev")
LAYOUT = ("relations.jsonl with TREx/P*.jsonl, Google_RE/*_test.jsonl, ConceptNet/test.jsonl or Squad/test.jsonl, "
          "at the top or under one folder such as data/")


@dataclass
class CorpusImport:
    """What one corpus import read and wrote."""

    corpus: str  # output folder name: trex, google_re, conceptnet, squad
    folder: Path  # OUT/<corpus>
    relations: dict[str, int] = field(default_factory=dict)  # relation -> test records, in relations.jsonl order
    splits: dict[str, int] = field(default_factory=dict)  # split (test, train, dev) -> records
    files_read: int = 0  # source files opened, relations.jsonl and train/dev files included
    files_written: int = 0  # output files, relations.jsonl included

    @property
    def records(self) -> int:
        """Records read and written, all splits together."""
        return sum(self.splits.values())


@dataclass
class ImportSummary:
    """The corpora imported (in CORPORA order) and those absent from the source."""

    source: Path
    out: Path
    corpora: dict[str, CorpusImport]
    absent: list[str]

    def lines(self) -> list[str]:
        """A small table: one line per corpus, a total line, and the absent corpora if any."""
        head = ("corpus", "relations", "records", "files read", "files written")
        rows = [(c.corpus, len(c.relations), c.records, c.files_read, c.files_written) for c in self.corpora.values()]
        rows.append(("total", *(sum(r[i] for r in rows) for i in range(1, 5))))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
        out = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
               for r in [head, *rows]]
        if self.absent:
            out.append("absent: " + ", ".join(f"{c} (no {SOURCE_FOLDERS[c]}/)" for c in self.absent))
        return out


class _Source:
    """LAMA's files under the data root of a zip or a folder, by path relative to that root (`TREx/P19.jsonl`)."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if not path.exists():
            raise DataError(f"LAMA source {path} not found: expected LAMA's data.zip or the folder it unpacks to")
        if path.is_dir():
            found = {p.relative_to(path).as_posix(): p.stat().st_size
                     for pattern in ("*.jsonl", "*/*.jsonl", "*/*/*.jsonl") for p in path.glob(pattern) if p.is_file()}
        else:
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"LAMA source {path} is not a readable zip ({e}): expected LAMA's data.zip or its folder") from None
            found = {i.filename: i.file_size for i in self.zip.infolist()
                     if not i.is_dir() and not i.filename.startswith("__MACOSX/") and i.filename.count("/") <= 2}
        try:
            self.prefix = self._find_prefix(found)
        except ProbeError:
            self.close()
            raise
        self.files = {name[len(self.prefix):]: size for name, size in found.items() if name.startswith(self.prefix)}

    def _find_prefix(self, found: dict[str, int]) -> str:
        def has_corpus(prefix: str) -> bool:
            return any(corpus_of(name[len(prefix):]) for name in found if name.startswith(prefix))

        if has_corpus(""):
            return ""
        tops = sorted({name.split("/")[0] + "/" for name in found if "/" in name})
        holding = [top for top in tops if has_corpus(top)]
        if len(holding) > 1:
            raise DataError(f"LAMA source {self.path} holds corpora under several folders ({', '.join(holding)}): expected one")
        if not holding:
            raise DataError(f"LAMA source {self.path} holds no LAMA corpus: expected {LAYOUT}")
        return holding[0]

    def where(self, rel: str) -> str:
        """How an error names a file: its path for a folder, `<zip>:<member>` for a zip."""
        if self.zip is not None:
            return f"{self.path}:{self.prefix}{rel}"
        return str(self.path / self.prefix / rel)

    def open(self, rel: str) -> IO[bytes]:
        try:
            if self.zip is not None:
                return self.zip.open(self.prefix + rel)
            return open(self.path / self.prefix / rel, "rb")
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{self.where(rel)}: cannot be read ({e})") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def corpus_of(rel: str) -> str | None:
    """The corpus a source file (relative to the data root) holds records of, or None."""
    parts = rel.split("/")
    if len(parts) != 2 or not parts[1].endswith(".jsonl") or parts[1].startswith("."):
        return None
    folder, name = parts
    if folder == "TREx":
        return "trex"
    if folder == "Google_RE" and name.endswith("_test.jsonl"):
        return "google_re"
    if folder in ("ConceptNet", "Squad") and name == "test.jsonl":
        return "conceptnet" if folder == "ConceptNet" else "squad"
    return None


def iter_records(stream: IO[bytes], where: str, progress: tqdm | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a malformed line is a ProbeError naming `where` and the line."""
    try:
        for lineno, raw in bounded_lines(stream, where):
            if progress is not None:
                progress.update(len(raw))
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}:{lineno}: expected UTF-8 text") from None
            row = json_record(line, where, lineno)
            if row is not None:
                yield lineno, row
    except (zipfile.BadZipFile, OSError) as e:  # a damaged zip member shows up while reading
        raise DataError(f"{where}: cannot be read ({e})") from None


def check_fact(row: dict, where: str, lineno: int) -> None:
    """A record must name a subject and an object."""
    if first_text(row, "sub_label", "sub") is None or first_text(row, "obj_label", "obj") is None:
        raise DataError(f"{where}:{lineno}: expected a subject (sub_label or sub) and an object (obj_label or obj)")


def _record_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


class _Writer:
    """A corpus being written into a hidden temporary folder inside OUT; `finish` renames it into place."""

    def __init__(self, out: Path, corpus: str):
        self.final = out / corpus
        self.tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{corpus}.tmp-"))
        self.files: dict[tuple[str, str], IO[str]] = {}
        self.entries: list[dict] = []  # relations.jsonl entries, in output order; those without records are left out
        self.summary = CorpusImport(corpus=corpus, folder=self.final)

    def touch(self, split: str, relation: str) -> IO[str]:
        """The output file of a relation's split, created (empty) on first use."""
        key = (split, relation)
        if key not in self.files:
            (self.tmp / split).mkdir(exist_ok=True)
            self.files[key] = open(self.tmp / split / f"{relation}.jsonl", "w", encoding="utf-8", newline="\n")
            self.summary.files_written += 1
            self.summary.splits.setdefault(split, 0)
            if split == "test":
                self.summary.relations.setdefault(relation, 0)
        return self.files[key]

    def write(self, split: str, relation: str, row: dict) -> None:
        self.touch(split, relation).write(_record_line(row))
        self.summary.splits[split] += 1
        if split == "test":
            self.summary.relations[relation] += 1

    def close_files(self) -> None:
        for f in self.files.values():
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def write_relations(self) -> None:
        """relations.jsonl: the entries of the relations written, in the order of `entries`."""
        self.close_files()
        kept = [e for e in self.entries if e["relation"] in self.summary.relations]
        with open(self.tmp / "relations.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(_record_line(e) for e in kept))
            f.flush()
            os.fsync(f.fileno())
        self.summary.files_written += 1
        self.summary.relations = {e["relation"]: self.summary.relations[e["relation"]] for e in kept}

    def finish(self) -> None:
        os.replace(self.tmp, self.final)
        self.final.chmod(folder_mode())  # mkdtemp made it 0700: the mode a plain mkdir gives

    def discard(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _import_trex(src: _Source, w: _Writer, bar: tqdm | None) -> None:
    if "relations.jsonl" not in src.files:
        raise DataError(f"{src.where('relations.jsonl')} not found: expected LAMA's T-REx relations.jsonl beside TREx/")
    entries = {}
    w.summary.files_read += 1
    with src.open("relations.jsonl") as f:
        for lineno, row in iter_records(f, src.where("relations.jsonl"), bar):
            rid, template = first_text(row, "relation"), first_text(row, "template")
            if rid is None or template is None:
                raise DataError(f"{src.where('relations.jsonl')}:{lineno}: expected non-empty 'relation' and 'template' fields")
            entries[rid] = {"relation": rid, "template": template, "label": row.get("label", ""), "type": row.get("type", "")}
    for rel in sorted(r for r in src.files if corpus_of(r) == "trex"):
        rid = Path(rel).stem
        if rid not in entries:
            raise DataError(f"{src.where(rel)}: relation {rid} is not in relations.jsonl: expected an entry with its template there")
        folder_name(rid, src.where(rel))
        w.summary.files_read += 1
        w.touch("test", rid)
        with src.open(rel) as f:
            for lineno, row in iter_records(f, src.where(rel), bar):
                check_fact(row, src.where(rel), lineno)
                w.write("test", rid, row)
    w.entries = list(entries.values())


def _import_train_dev(train_dev: Path, w: _Writer, bar: tqdm | None) -> list[str]:
    """Add train/ and dev/ files of the T-REx relations imported; returns the relations skipped (no T-REx test file)."""
    files = {(p.parent.name, p.stem): p for split in SPLITS for p in sorted(train_dev.glob(f"*/{split}.jsonl"))}
    if not files:
        raise DataError(f"train/dev folder {train_dev} holds no relation splits: expected P19/train.jsonl and P19/dev.jsonl folders")
    skipped = sorted({rid for rid, _ in files if rid not in w.summary.relations})
    for (rid, split), path in sorted(files.items(), key=lambda kv: (kv[0][0], SPLITS.index(kv[0][1]))):
        if rid in skipped:
            continue
        w.summary.files_read += 1
        w.touch(split, rid)
        with open(path, "rb") as f:
            for lineno, row in iter_records(f, str(path), bar):
                check_fact(row, str(path), lineno)
                w.write(split, rid, row)
    return skipped


def _records_with_pred(src: _Source, rel: str, w: _Writer, bar: tqdm | None, example: str) -> Iterator[tuple[str, dict, str]]:
    """(file:line, record, its `pred`) of one file of facts that name their relation in `pred`."""
    w.summary.files_read += 1
    with src.open(rel) as f:
        for lineno, row in iter_records(f, src.where(rel), bar):
            check_fact(row, src.where(rel), lineno)
            pred = first_text(row, "pred")
            if pred is None:
                raise DataError(f"{src.where(rel)}:{lineno}: expected a relation in 'pred' (like {example})")
            yield f"{src.where(rel)}:{lineno}", row, pred


def _import_google_re(src: _Source, w: _Writer, bar: tqdm | None) -> None:
    templates = template_sources(GOOGLE_RE_TEMPLATES)
    for rel in sorted(r for r in src.files if corpus_of(r) == "google_re"):
        for where, row, pred in _records_with_pred(src, rel, w, bar, "/people/person/place_of_birth"):
            name = pred.rstrip("/").rsplit("/", 1)[-1]
            if name not in templates:
                raise DataError(f"{where}: unknown Google-RE relation {name!r} (pred {pred!r}): expected one "
                                f"of {', '.join(templates)}, the relations of {GOOGLE_RE_TEMPLATES}")
            w.write("test", name, row)
    w.entries = [{"relation": k, "template": t, "label": k.replace("_", " "), "type": ""} for k, t in templates.items()]


def _import_conceptnet(src: _Source, w: _Writer, bar: tqdm | None) -> None:
    for where, row, pred in _records_with_pred(src, "ConceptNet/test.jsonl", w, bar, "HasSubevent"):
        w.write("test", folder_name(pred, where), row)
    w.entries = [{"relation": r, "label": r, "type": ""} for r in w.summary.relations]


def _import_squad(src: _Source, w: _Writer, bar: tqdm | None) -> None:
    rel = "Squad/test.jsonl"
    w.summary.files_read += 1
    w.touch("test", "squad")
    with src.open(rel) as f:
        for lineno, row in iter_records(f, src.where(rel), bar):
            check_fact(row, src.where(rel), lineno)
            w.write("test", "squad", row)
    w.entries = [{"relation": "squad", "label": "SQuAD", "type": ""}]


IMPORTERS = {"trex": _import_trex, "google_re": _import_google_re, "conceptnet": _import_conceptnet, "squad": _import_squad}


def import_lama(source: str | Path, out: str | Path, train_dev: str | Path | None = None,
                log: Callable[[str], None] | None = print, progress: bool = True) -> ImportSummary:
    """Import LAMA's data.zip or unpacked folder into OUT/<corpus>/ folders; `train_dev` adds T-REx train/dev splits.

    Refuses (ProbeError) when a corpus folder it would write already exists in OUT; on any error nothing is left in OUT.
    """
    source, out = Path(source), Path(out)
    log = log or (lambda _msg: None)
    train_dev = Path(train_dev) if train_dev is not None else None
    if train_dev is not None and not train_dev.is_dir():
        raise DataError(f"train/dev folder {train_dev} not found: expected AutoPrompt's folder of P19/train.jsonl, P19/dev.jsonl")
    src = _Source(source)
    try:
        present = {corpus_of(rel) for rel in src.files} - {None}
        corpora = [c for c in CORPORA if c in present]
        absent = [c for c in CORPORA if c not in present]
        if train_dev is not None and "trex" not in present:
            raise DataError(f"train/dev folder {train_dev} given, but {source} has no TREx/: expected a source with T-REx")
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"output {out} is a file: expected a folder (new, or without {', '.join(c + '/' for c in corpora)})")
        clash = [c for c in corpora if (out / c).exists()]
        if clash:
            raise RunFolderError(f"output folder {out} already holds {', '.join(c + '/' for c in clash)}: expected a new folder "
                                 "or one without the corpora to import")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        writers: list[_Writer] = []
        skipped: list[str] = []
        total = sum(size for rel, size in src.files.items() if corpus_of(rel) in present)
        total += src.files.get("relations.jsonl", 0) if "trex" in present else 0
        if train_dev is not None:
            total += sum(p.stat().st_size for split in SPLITS for p in train_dev.glob(f"*/{split}.jsonl"))
        try:
            with tqdm(total=total, unit="B", unit_scale=True, desc="import", disable=not progress, dynamic_ncols=True) as bar:
                for corpus in corpora:
                    w = _Writer(out, corpus)
                    writers.append(w)
                    IMPORTERS[corpus](src, w, bar)
                    if corpus == "trex" and train_dev is not None:
                        skipped = _import_train_dev(train_dev, w, bar)
                    w.write_relations()
            for w in writers:
                w.finish()
        except BaseException:
            for w in writers:
                w.discard()
            if created and not any(out.iterdir()):
                out.rmdir()
            raise
    finally:
        src.close()
    summary = ImportSummary(source=source, out=out, corpora={w.summary.corpus: w.summary for w in writers}, absent=absent)
    if skipped:
        log(f"train/dev: skipped {', '.join(skipped)} (no T-REx test file)")
    for c in summary.corpora.values():
        log(f"{c.corpus}: {len(c.relations)} relation{'s' * (len(c.relations) != 1)}, {c.records} records -> {c.folder}")
    if absent:
        log(f"absent from {source}: {', '.join(absent)}")
    return summary
