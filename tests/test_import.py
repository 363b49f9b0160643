"""import_lama on hand-written files in LAMA's data.zip formats (tests/fixtures/lama_data), as a zip and as a folder."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from probe import lama_import
from probe.errors import ProbeError
from probe.lama_import import import_lama
from probe.template_files import parse_template_file

FIXTURES = Path(__file__).parent / "fixtures" / "lama_data"
DATA = FIXTURES / "data"  # the folder LAMA's data.zip unpacks to
TRAIN_DEV = FIXTURES / "train_dev"  # AutoPrompt's P19/{train,dev}.jsonl layout
TEMPLATE_FILE = Path(__file__).parents[1] / "templates" / "google_re.txt"


def make_zip(folder: Path, path: Path, top: str = "data/") -> Path:
    """A zip of `folder`'s files under `top`, as LAMA ships data.zip."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, top + f.relative_to(folder).as_posix())
    return path


def copy_data(tmp_path: Path, *keep: str) -> Path:
    """A copy of the fixture data folder, with only the `keep` corpus folders if any are named."""
    root = shutil.copytree(DATA, tmp_path / "src")
    if keep:
        for sub in ("TREx", "Google_RE", "ConceptNet", "Squad"):
            if sub not in keep:
                shutil.rmtree(root / sub)
    return root


def source_lines(path: Path) -> list[str]:
    """A source file's records, re-serialised as the import must write them."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def quiet_import(source, out, train_dev=None) -> tuple[lama_import.ImportSummary, list[str]]:
    logged: list[str] = []
    return import_lama(source, out, train_dev=train_dev, log=logged.append, progress=False), logged


@pytest.fixture
def zipped(tmp_path) -> Path:
    return make_zip(DATA, tmp_path / "data.zip")


def test_zip_import_writes_one_folder_per_corpus_and_nothing_else(zipped, tmp_path):
    out = tmp_path / "facts"
    summary, _ = quiet_import(zipped, out, TRAIN_DEV)
    assert sorted(p.name for p in out.iterdir()) == ["conceptnet", "google_re", "squad", "trex"]  # no temporary folder left
    assert sorted(tree(out)) == [
        "conceptnet/relations.jsonl", "conceptnet/test/HasSubevent.jsonl", "conceptnet/test/UsedFor.jsonl",
        "google_re/relations.jsonl", "google_re/test/date_of_birth.jsonl", "google_re/test/place_of_birth.jsonl",
        "google_re/test/place_of_death.jsonl",
        "squad/relations.jsonl", "squad/test/squad.jsonl",
        "trex/dev/P19.jsonl", "trex/relations.jsonl", "trex/test/P19.jsonl", "trex/test/P36.jsonl", "trex/train/P19.jsonl",
    ]
    assert summary.out == out and summary.absent == []
    assert list(summary.corpora) == ["trex", "google_re", "conceptnet", "squad"]


def test_relations_files(zipped, tmp_path):
    out = tmp_path / "facts"
    quiet_import(zipped, out)
    rel = {c: [json.loads(line) for line in read_lines(out / c / "relations.jsonl")] for c in lama_import.CORPORA}
    assert rel["trex"] == [  # P37 is in relations.jsonl but has no TREx file
        {"relation": "P19", "template": "[X] was born in [Y] .", "label": "place of birth", "type": "N-1"},
        {"relation": "P36", "template": "The capital of [X] is [Y] .", "label": "capital", "type": "1-1"},
    ]
    assert rel["google_re"] == [
        {"relation": "place_of_birth", "template": "[X] was born in [Y] .", "label": "place of birth", "type": ""},
        {"relation": "date_of_birth", "template": "[X] (born [Y]).", "label": "date of birth", "type": ""},
        {"relation": "place_of_death", "template": "[X] died in [Y] .", "label": "place of death", "type": ""},
    ]
    assert rel["conceptnet"] == [  # cloze-only: no template; relations in order of first appearance
        {"relation": "UsedFor", "label": "UsedFor", "type": ""},
        {"relation": "HasSubevent", "label": "HasSubevent", "type": ""},
    ]
    assert rel["squad"] == [{"relation": "squad", "label": "SQuAD", "type": ""}]


def test_google_re_templates_are_those_of_the_template_file(zipped, tmp_path):
    out = tmp_path / "facts"
    quiet_import(zipped, out)
    shipped = {k: t.source for k, t in parse_template_file(TEMPLATE_FILE).entries.items()}
    written = {r["relation"]: r["template"] for r in map(json.loads, read_lines(out / "google_re" / "relations.jsonl"))}
    assert written == shipped
    assert set(shipped) == {"place_of_birth", "date_of_birth", "place_of_death"}


def test_google_re_templates_follow_an_edited_template_file(zipped, tmp_path, monkeypatch):
    edited = tmp_path / "google_re.txt"
    edited.write_text("place_of_birth: [X] came from [Y] .\ndate_of_birth: [X] was born in [Y] .\n"
                      "place_of_death: [X] passed away in [Y] .\n", encoding="utf-8")
    monkeypatch.setattr(lama_import, "GOOGLE_RE_TEMPLATES", edited)
    quiet_import(zipped, tmp_path / "facts")
    written = [json.loads(line)["template"] for line in read_lines(tmp_path / "facts" / "google_re" / "relations.jsonl")]
    assert written == ["[X] came from [Y] .", "[X] was born in [Y] .", "[X] passed away in [Y] ."]


def test_records_are_the_source_records_reserialised_in_order(zipped, tmp_path):
    out = tmp_path / "facts"
    quiet_import(zipped, out, TRAIN_DEV)
    assert read_lines(out / "trex/test/P19.jsonl") == source_lines(DATA / "TREx/P19.jsonl")
    assert read_lines(out / "trex/test/P36.jsonl") == source_lines(DATA / "TREx/P36.jsonl")
    assert read_lines(out / "trex/train/P19.jsonl") == source_lines(TRAIN_DEV / "P19/train.jsonl")
    assert read_lines(out / "trex/dev/P19.jsonl") == source_lines(TRAIN_DEV / "P19/dev.jsonl")
    for name in ("place_of_birth", "date_of_birth", "place_of_death"):
        assert read_lines(out / f"google_re/test/{name}.jsonl") == source_lines(DATA / f"Google_RE/{name}_test.jsonl")
    conceptnet = source_lines(DATA / "ConceptNet/test.jsonl")
    for pred in ("UsedFor", "HasSubevent"):
        expected = [line for line in conceptnet if json.loads(line)["pred"] == pred]
        assert len(expected) == 2
        assert read_lines(out / f"conceptnet/test/{pred}.jsonl") == expected
    assert read_lines(out / "squad/test/squad.jsonl") == source_lines(DATA / "Squad/test.jsonl")
    # non-ASCII is written as itself, not as \u escapes (the fixture source has escapes)
    text = (out / "trex/test/P19.jsonl").read_text(encoding="utf-8")
    assert "Besançon" in text and "\\u00e7" not in text
    assert "\\u00e7" in (DATA / "TREx/P19.jsonl").read_text(encoding="utf-8")


def test_folder_source_gives_the_same_files_as_the_zip(zipped, tmp_path):
    quiet_import(zipped, tmp_path / "from_zip", TRAIN_DEV)
    quiet_import(DATA, tmp_path / "from_folder", TRAIN_DEV)
    quiet_import(FIXTURES, tmp_path / "from_parent", TRAIN_DEV)  # the data root found under one folder (data/)
    assert tree(tmp_path / "from_folder") == tree(tmp_path / "from_zip")
    assert tree(tmp_path / "from_parent") == tree(tmp_path / "from_zip")
    flat = make_zip(DATA, tmp_path / "flat.zip", top="")  # a zip without the top-level folder
    quiet_import(flat, tmp_path / "from_flat")
    assert tree(tmp_path / "from_flat") == {k: v for k, v in tree(tmp_path / "from_zip").items() if "/train/" not in k
                                           and "/dev/" not in k}


def test_summary_counts_and_table(zipped, tmp_path):
    summary, logged = quiet_import(zipped, tmp_path / "facts", TRAIN_DEV)
    trex, google, cn, squad = (summary.corpora[c] for c in lama_import.CORPORA)
    assert trex.relations == {"P19": 3, "P36": 2}
    assert trex.splits == {"test": 5, "train": 3, "dev": 1}
    assert (trex.records, trex.files_read, trex.files_written) == (9, 5, 5)
    assert trex.folder == tmp_path / "facts" / "trex"
    assert google.relations == {"place_of_birth": 2, "date_of_birth": 2, "place_of_death": 1}
    assert (google.records, google.files_read, google.files_written) == (5, 3, 4)
    assert cn.relations == {"UsedFor": 2, "HasSubevent": 2}
    assert (cn.records, cn.files_read, cn.files_written) == (4, 1, 3)
    assert squad.relations == {"squad": 2}
    assert (squad.records, squad.files_read, squad.files_written) == (2, 1, 2)
    assert summary.lines() == [
        "corpus      relations  records  files read  files written",
        "trex                2        9           5              5",
        "google_re           3        5           3              4",
        "conceptnet          2        4           1              3",
        "squad               1        2           1              2",
        "total               8       20          10             14",
    ]
    assert "train/dev: skipped P37 (no T-REx test file)" in logged
    assert f"trex: 2 relations, 9 records -> {tmp_path / 'facts' / 'trex'}" in logged


def test_partial_source_imports_what_is_there_and_names_the_rest(tmp_path):
    src = copy_data(tmp_path, "Google_RE")  # relations.jsonl stays: without TREx/ it is no corpus
    summary, logged = quiet_import(src, tmp_path / "facts")
    assert [p.name for p in (tmp_path / "facts").iterdir()] == ["google_re"]
    assert list(summary.corpora) == ["google_re"]
    assert summary.absent == ["trex", "conceptnet", "squad"]
    assert summary.lines() == [
        "corpus     relations  records  files read  files written",
        "google_re          3        5           3              4",
        "total              3        5           3              4",
        "absent: trex (no TREx/), conceptnet (no ConceptNet/), squad (no Squad/)",
    ]
    assert logged[-1] == f"absent from {src}: trex, conceptnet, squad"


def test_google_re_relation_is_named_by_pred_not_by_file(tmp_path):
    src = copy_data(tmp_path, "Google_RE")
    (src / "Google_RE" / "place_of_death_test.jsonl").rename(src / "Google_RE" / "other_test.jsonl")
    summary, _ = quiet_import(src, tmp_path / "facts")
    assert summary.corpora["google_re"].relations == {"place_of_birth": 2, "date_of_birth": 2, "place_of_death": 1}
    assert read_lines(tmp_path / "facts/google_re/test/place_of_death.jsonl") == source_lines(src / "Google_RE/other_test.jsonl")


def test_existing_out_with_other_files_is_fine(zipped, tmp_path):
    out = tmp_path / "facts"
    (out / "notes").mkdir(parents=True)
    (out / "README.txt").write_text("mine\n", encoding="utf-8")
    summary, _ = quiet_import(zipped, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "conceptnet", "google_re", "notes", "squad", "trex"]
    assert summary.corpora["squad"].records == 2


def test_existing_corpus_folder_in_out_is_refused(zipped, tmp_path):
    out = tmp_path / "facts"
    (out / "google_re").mkdir(parents=True)
    with pytest.raises(ProbeError, match=r"already holds google_re/") as e:
        quiet_import(zipped, out)
    assert str(out) in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["google_re"]  # nothing written
    # a corpus folder the source does not have is no clash
    src = copy_data(tmp_path, "Squad")
    summary, _ = quiet_import(src, out)
    assert list(summary.corpora) == ["squad"]


def test_malformed_line_names_folder_file_and_line(tmp_path):
    src = copy_data(tmp_path)
    bad = src / "Google_RE" / "place_of_birth_test.jsonl"
    bad.write_text(bad.read_text(encoding="utf-8") + '{"sub_label": "Orla", \n', encoding="utf-8")
    out = tmp_path / "facts"
    with pytest.raises(ProbeError) as e:
        quiet_import(src, out)
    assert str(e.value).startswith(f"{bad}:3: malformed JSON line (")
    assert not out.exists()  # created by the import, removed again: no half-written corpus (trex was done before)


def test_malformed_line_in_a_zip_names_zip_member_and_line(tmp_path):
    src = copy_data(tmp_path)
    bad = src / "Squad" / "test.jsonl"
    bad.write_text(bad.read_text(encoding="utf-8") + "[1, 2]\n", encoding="utf-8")
    archive = make_zip(src, tmp_path / "data.zip")
    out = tmp_path / "facts"
    out.mkdir()
    with pytest.raises(ProbeError) as e:
        quiet_import(archive, out)
    assert str(e.value) == f"{archive}:data/Squad/test.jsonl:3: expected a JSON object, got list"
    assert list(out.iterdir()) == []  # every other corpus was complete, yet none is left behind


@pytest.mark.parametrize("record", [
    {"pred": "/people/person/place_of_birth", "sub": "/m/0fx9", "sub_label": "Edda", "masked_sentences": ["[MASK]"]},
    {"pred": "/people/person/place_of_birth", "obj_label": "Oslo", "sub_label": ""},
])
def test_record_without_subject_or_object(tmp_path, record):
    src = copy_data(tmp_path, "Google_RE")
    bad = src / "Google_RE" / "date_of_birth_test.jsonl"
    bad.write_text(bad.read_text(encoding="utf-8") + json.dumps(record) + "\n", encoding="utf-8")
    archive = make_zip(src, tmp_path / "data.zip")
    with pytest.raises(ProbeError) as e:
        quiet_import(archive, tmp_path / "facts")
    assert str(e.value) == (f"{archive}:data/Google_RE/date_of_birth_test.jsonl:3: "
                            "expected a subject (sub_label or sub) and an object (obj_label or obj)")


def test_conceptnet_subject_may_be_only_in_sub(tmp_path):
    src = copy_data(tmp_path, "ConceptNet")
    summary, _ = quiet_import(src, tmp_path / "facts")
    assert summary.corpora["conceptnet"].records == 4  # three of the four records have no sub_label


def test_source_without_any_corpus(tmp_path):
    empty = tmp_path / "empty"
    (empty / "data" / "Other").mkdir(parents=True)
    (empty / "data" / "Other" / "test.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=r"holds no LAMA corpus: expected relations\.jsonl with TREx/P\*\.jsonl") as e:
        quiet_import(empty, tmp_path / "facts")
    assert str(empty) in str(e.value)
    archive = make_zip(empty / "data", tmp_path / "other.zip")
    with pytest.raises(ProbeError, match=r"other\.zip holds no LAMA corpus"):
        quiet_import(archive, tmp_path / "facts")
    assert not (tmp_path / "facts").exists()


def test_missing_source_and_not_a_zip(tmp_path):
    with pytest.raises(ProbeError, match=r"LAMA source .*nowhere\.zip not found: expected LAMA's data\.zip"):
        quiet_import(tmp_path / "nowhere.zip", tmp_path / "facts")
    text = tmp_path / "data.zip"
    text.write_text("not a zip\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=r"is not a readable zip"):
        quiet_import(text, tmp_path / "facts")


def test_trex_without_relations_file_or_entry(tmp_path):
    src = copy_data(tmp_path, "TREx")
    (src / "TREx" / "P999.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ProbeError, match=r"P999\.jsonl: relation P999 is not in relations\.jsonl"):
        quiet_import(src, tmp_path / "facts")
    (src / "relations.jsonl").unlink()
    with pytest.raises(ProbeError, match=r"relations\.jsonl not found: expected LAMA's T-REx relations\.jsonl beside TREx/"):
        quiet_import(src, tmp_path / "facts")


def test_unknown_google_re_relation_and_unsafe_conceptnet_pred(tmp_path):
    src = copy_data(tmp_path, "Google_RE", "ConceptNet")
    bad = src / "Google_RE" / "place_of_death_test.jsonl"
    bad.write_text(json.dumps({"pred": "/people/person/nationality", "sub_label": "A", "obj_label": "B"}) + "\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=r"place_of_death_test\.jsonl:1: unknown Google-RE relation 'nationality'"):
        quiet_import(src, tmp_path / "facts")
    bad.unlink()
    cn = src / "ConceptNet" / "test.jsonl"
    cn.write_text(json.dumps({"sub": "a", "obj_label": "b", "pred": "../escape"}) + "\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=r"test\.jsonl:1: relation name '\.\./escape' holds a path separator: expected a folder name"):
        quiet_import(src, tmp_path / "facts")
    assert not (tmp_path / "escape.jsonl").exists() and not (tmp_path / "facts").exists()


def test_train_dev_needs_trex_and_a_split_folder(tmp_path):
    src = copy_data(tmp_path, "Squad")
    with pytest.raises(ProbeError, match=r"has no TREx/"):
        quiet_import(src, tmp_path / "facts", TRAIN_DEV)
    with pytest.raises(ProbeError, match=r"train/dev folder .*missing not found"):
        quiet_import(DATA, tmp_path / "facts", tmp_path / "missing")
    (tmp_path / "td").mkdir()
    with pytest.raises(ProbeError, match=r"holds no relation splits: expected P19/train\.jsonl"):
        quiet_import(DATA, tmp_path / "facts", tmp_path / "td")
    assert not (tmp_path / "facts").exists()
