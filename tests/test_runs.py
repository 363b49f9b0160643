"""probe.runs: atomic writes, run folders, resume checks, results.json / relations.csv / summary.md."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import write_relation

from probe.errors import ProbeError
from probe.runs import (
    IDENTITY_KEYS,
    RunFolder,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    markdown_table,
    read_json,
    relations_table,
)

CONFIG = {"command": "eval", "model": "smollm2", "method": "manual", "split": "test_34k", "vocab": "common",
          "data": "/lama", "template_file": None, "seed": None, "batch_size": 128, "created": "now"}


def metrics(rid, type_, n, p1, p10, mrr, **extra):
    return {"relation": rid, "label": f"label {rid}", "type": type_, "n_facts": n, "n_dropped": 1,
            "template": "[X] is [Y] .", "p1": p1, "p10": p10, "mrr": mrr, **extra}


# ---- atomic writes --------------------------------------------------------------------------


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "a" / "c.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "a" / "d.json", {"x": [1, 2], "é": "ü"})
    atomic_write_text(tmp_path / "a" / "b.txt", "again")  # replacing an existing file
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.txt", "c.bin", "d.json"]
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8") == "again"
    assert (tmp_path / "a" / "c.bin").read_bytes() == b"\x00\x01"
    text = (tmp_path / "a" / "d.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"x": [1, 2], "é": "ü"}
    assert "é" in text and text.endswith("\n")


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "d.json"
    atomic_write_json(path, {"old": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # fails before writing
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails while writing the temp file
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_read_json_errors(tmp_path):
    with pytest.raises(ProbeError, match="nope.json not found"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"a": 1,\n')
    with pytest.raises(ProbeError, match=r"bad.json: malformed JSON \(.* at line 2\)"):
        read_json(tmp_path / "bad.json")


# ---- run folders ----------------------------------------------------------------------------


def test_new_run_folder_writes_config(tmp_path):
    run = RunFolder(tmp_path / "run", CONFIG)
    assert not (tmp_path / "run").exists()  # opening only checks: the folder is made once every check has passed
    run.create()
    assert read_json(tmp_path / "run" / "config.json") == CONFIG
    assert not run.is_done("P19")
    assert run.relation_dir("P19") == tmp_path / "run" / "P19"


def test_existing_run_folder_needs_resume(tmp_path):
    RunFolder(tmp_path / "run", CONFIG).create()
    with pytest.raises(ProbeError) as e:
        RunFolder(tmp_path / "run", CONFIG)
    assert str(e.value) == (f"run folder {tmp_path / 'run'} already exists: pass --resume to continue it, "
                            "or another --out")
    RunFolder(tmp_path / "run", {**CONFIG, "created": "later", "batch_size": 4}, resume=True)  # not identity keys


def test_resume_with_other_model_names_the_key(tmp_path):
    RunFolder(tmp_path / "run", CONFIG).create()
    with pytest.raises(ProbeError) as e:
        RunFolder(tmp_path / "run", {**CONFIG, "model": "bert-base-cased"}, resume=True)
    msg = str(e.value)
    assert msg == (f"run folder {tmp_path / 'run'} was made with other settings "
                   "(model: 'smollm2' there, 'bert-base-cased' asked)")
    with pytest.raises(ProbeError) as e:
        RunFolder(tmp_path / "run", {**CONFIG, "split": "test_29k", "seed": 1}, resume=True)
    assert "split: 'test_34k' there, 'test_29k' asked" in str(e.value)
    assert "seed: None there, 1 asked" in str(e.value)
    assert "model" not in str(e.value).split("settings")[1]
    assert read_json(tmp_path / "run" / "config.json") == CONFIG  # a refused resume leaves the config alone


@pytest.mark.parametrize("key", IDENTITY_KEYS)
def test_every_identity_key_refuses_a_resume_with_another_value(tmp_path, key):
    RunFolder(tmp_path / "run", {**CONFIG, key: "one"}).create()
    with pytest.raises(ProbeError) as e:
        RunFolder(tmp_path / "run", {**CONFIG, key: "other"}, resume=True)
    assert f"made with other settings ({key}: 'one' there, 'other' asked)" in str(e.value)


def test_a_refused_start_takes_back_the_folder_it_made(tmp_path):
    run = RunFolder(tmp_path / "run", CONFIG).create()
    run.abandon()
    assert not (tmp_path / "run").exists()
    RunFolder(tmp_path / "run", CONFIG).create()  # so the rerun is not blocked
    # a folder with a finished relation, or one this run did not make, is kept
    kept = RunFolder(tmp_path / "run2", CONFIG).create()
    write_relation(kept, "P19", {"relation": "P19", "type": "N-1", "n_facts": 1, "p1": 1.0, "p10": 1.0, "mrr": 1.0})
    kept.abandon()
    assert (tmp_path / "run2" / "P19" / "metrics.json").exists()
    resumed = RunFolder(tmp_path / "run", CONFIG, resume=True).create()
    resumed.abandon()
    assert (tmp_path / "run" / "config.json").exists()


def test_save_relation_rows_and_summary(tmp_path):
    run = RunFolder(tmp_path / "run", CONFIG)
    preds = [{"sub": "Dante", "obj": "Florence", "rank": 1, "top10": ["Florence"]},
             {"sub": "Hugo", "obj": "Besançon", "rank": 3, "top10": ["Paris"]}]
    write_relation(run, "P101", metrics("P101", "N-M", 30, 10.0, 40.0, 0.2), preds)
    write_relation(run, "P19", metrics("P19", "N-1", 10, 50.0, 80.0, 0.6))
    write_relation(run, "P36", metrics("P36", "1-1", 60, 100.0, 100.0, 1.0))
    assert run.is_done("P19") and run.is_done("P101") and not run.is_done("P20")
    assert [r["relation"] for r in run.rows()] == ["P19", "P36", "P101"]  # by number, not text
    lines = (tmp_path / "run" / "P101" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == preds
    assert not (tmp_path / "run" / "P19" / "predictions.jsonl").exists()

    results = run.write_summary()
    saved = read_json(tmp_path / "run" / "results.json")
    assert saved == results
    assert saved["config"] == CONFIG
    assert [r["relation"] for r in saved["relations"]] == ["P19", "P36", "P101"]
    s = saved["summary"]
    assert list(s) == ["all", "1-1", "N-1", "N-M"]
    assert s["all"]["facts"] == 100 and s["all"]["relations"] == 3
    assert s["all"]["micro_p1"] == pytest.approx(68.0)
    assert s["all"]["macro_p1"] == pytest.approx(160 / 3)

    csv = pd.read_csv(tmp_path / "run" / "relations.csv")
    assert list(csv.columns) == ["relation", "label", "type", "n_facts", "n_dropped", "p1", "p10", "mrr"]
    assert csv["relation"].tolist() == ["P19", "P36", "P101"]
    assert csv["p1"].tolist() == [50.0, 100.0, 10.0]
    assert csv["n_facts"].tolist() == [10, 60, 30]

    md = (tmp_path / "run" / "summary.md").read_text(encoding="utf-8")
    assert md.startswith("# manual on smollm2 (test_34k, vocab common)\n")
    assert "| P19 | label P19 | N-1 | 10 | 1 | 50.00 | 80.00 | 0.600 |" in md
    assert "| all | 3 | 100 | 53.33 | 68.00 |" in md
    run.release()  # the run's lock file goes with its lock
    assert not [p for p in (tmp_path / "run").rglob(".*")]  # no temp files anywhere


def test_summary_of_an_empty_run(tmp_path):
    run = RunFolder(tmp_path / "run", CONFIG)
    results = run.write_summary()
    assert results["relations"] == []
    assert results["summary"]["all"]["relations"] == 0
    header = (tmp_path / "run" / "relations.csv").read_text().strip()
    assert header == "relation,label,type,n_facts,n_dropped,p1,p10,mrr"


def test_relations_table_extra_columns():
    rows = [metrics("P19", "N-1", 10, 50.0, 80.0, 0.6, dev_p1=55.0), metrics("P20", "N-1", 5, 20.0, 60.0, 0.3)]
    df = relations_table(rows)
    assert list(df.columns)[-1] == "dev_p1"
    assert df["dev_p1"].tolist()[0] == 55.0 and pd.isna(df["dev_p1"].tolist()[1])
    assert "manual_p1" not in df.columns


def test_markdown_table_formats():
    df = pd.DataFrame([{"a": "x", "b": 0.1234, "c": 12.345, "d": 0.0, "e": None, "f": 3}])
    assert markdown_table(df).splitlines() == ["| a | b | c | d | e | f |", "|---|---|---|---|---|---|",
                                               "| x | 0.123 | 12.35 | 0.00 |  | 3 |"]
