"""Never harm what probe did not make (issue 41): each test is a row of the issue's table, seen to fail before its fix.

A run touches only its own folder; names are checked before they become paths; one run per folder at a time; foreign
run folders are data, not orders; resume checks what it trusts; overlapping splits are said; input is bounded."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import zipfile
from pathlib import Path

import pytest
from conftest import assert_user_error, cli_in_process, make_fake_lama, run_cli, write_jsonl

FAST = ["--epochs", "1", "--min-steps", "0", "--batch-size", "2", "--eval-every", "1", "--dtype", "float32"]
CAPITALS = [{"subject": "France", "object": "Paris"}, {"subject": "Italy", "object": "Rome"},
            {"subject": "Germany", "object": "Berlin"}]


def victim(tmp_path: Path) -> Path:
    """A user's folder: a file and a subfolder that probe did not write."""
    folder = tmp_path / "victim"
    (folder / "keep").mkdir(parents=True)
    (folder / "notes.txt").write_text("x\n")
    (folder / "keep" / "a.txt").write_text("a\n")
    return folder


def untouched(folder: Path) -> bool:
    return (folder / "notes.txt").read_text() == "x\n" and (folder / "keep" / "a.txt").read_text() == "a\n"


def broken_model(tmp_path: Path, tiny_causal_dir: Path) -> Path:
    """A copy of the tiny causal model whose model.safetensors is cut short."""
    folder = tmp_path / "BROKEN"
    folder.mkdir()
    for f in Path(tiny_causal_dir).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4])
    return folder


def facts_file(tmp_path: Path, rows: list[dict], name: str = "cap.jsonl") -> Path:
    path = tmp_path / name
    write_jsonl(path, rows)
    return path


# ---- row 1: a failed run never removes a folder it did not make -------------------------------------


def test_a_folder_of_the_users_files_is_refused_and_kept(tmp_path, tiny_causal_dir):
    folder, broken = victim(tmp_path), broken_model(tmp_path, tiny_causal_dir)
    cap = facts_file(tmp_path, CAPITALS)
    args = ["eval", "--facts", cap, "--template", "[X] capital is [Y] .", "--vocab", "objects"]
    assert_user_error(cli_in_process(*args, "--model", broken, "--out", folder),
                      f"--out {folder} holds files that probe did not write")
    assert untouched(folder)
    assert_user_error(cli_in_process(*args, "--model", broken, "--out", ".", cwd=folder), "holds files that probe did not write")
    assert untouched(folder) and sorted(p.name for p in folder.iterdir()) == ["keep", "notes.txt"]


def test_an_empty_folder_given_as_out_stays_when_the_model_fails_to_load(tmp_path, tiny_causal_dir):
    out = tmp_path / "mine"
    out.mkdir()
    cap = facts_file(tmp_path, CAPITALS)
    proc = cli_in_process("eval", "--facts", cap, "--template", "[X] capital is [Y] .", "--vocab", "objects",
                          "--model", broken_model(tmp_path, tiny_causal_dir), "--out", out)
    assert_user_error(proc, "cannot load model", "model.safetensors", only_line=False)  # found once the weights load
    assert out.is_dir() and not list(out.iterdir())


def test_a_failed_run_removes_only_the_files_it_wrote(tmp_path, tiny_causal_dir, fake_lama, monkeypatch):
    from probe.commands.eval import EvalCell

    out = tmp_path / "new" / "run"

    def fail(self, loaded):
        (Path(self.root) / "P19").mkdir(exist_ok=True)
        (Path(self.root) / "P19" / "predictions.jsonl").write_text("{}\n")  # a file this run wrote, half done
        raise ProbeError("the disk is full")

    from probe.errors import ProbeError

    monkeypatch.setattr(EvalCell, "run", fail)
    assert_user_error(cli_in_process("eval", "--model", tiny_causal_dir, "-r", "P19", "--data", fake_lama, "--out", out),
                      "the disk is full", only_line=False)
    assert not (tmp_path / "new").exists()  # every folder it made, and nothing else, is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["lama"])


def test_a_run_folder_is_never_removed_by_a_resume_that_fails(tmp_path, tiny_causal_dir, fake_lama, monkeypatch):
    from probe.commands.eval import EvalCell
    from probe.errors import ProbeError

    out = tmp_path / "run"
    args = ["eval", "--model", tiny_causal_dir, "-r", "P19", "--data", fake_lama, "--out", out]
    first = cli_in_process(*args)
    assert first.returncode == 0, first.stderr
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def fail(self, loaded):
        raise ProbeError("the disk is full")

    monkeypatch.setattr(EvalCell, "run", fail)
    (out / "P19" / "metrics.json").write_text("{")  # damaged: the resume runs it again, and fails
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert_user_error(cli_in_process(*args, "--resume"), "the disk is full", only_line=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


# ---- rows 2-5: names are checked before they become paths ------------------------------------------


@pytest.mark.parametrize("name, problem", [
    ("/", "holds a path separator"), ("..", "is a path to a folder"), (".", "is a path to a folder"),
    ("a/b", "holds a path separator"), ("a\x00b", "holds a control character"), ("x" * 300, "is 300 bytes long"),
])
def test_relation_names_that_cannot_be_folders_are_refused_before_anything_is_written(tmp_path, tiny_causal_dir,
                                                                                      name, problem):
    cap = facts_file(tmp_path / "in", [{**row, "relation": name} for row in CAPITALS])
    out = tmp_path / "work" / "run"
    for command in (["eval"], ["train", "--train-facts", cap, *FAST]):
        proc = cli_in_process(*command, "--facts", cap, "--template" if command == ["eval"] else "--manual-template",
                              "[X] capital is [Y] .", "--model", tiny_causal_dir, "--vocab", "objects", "--out", out)
        assert_user_error(proc, f"{cap}:1: relation name", problem)
        assert not (tmp_path / "work").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_relations_that_would_share_a_folder_are_refused_not_merged(tmp_path):
    from probe.data import open_data
    from probe.errors import ProbeError

    rows = [{"pred": "/corpusA/born_in", "sub_label": "Dante", "obj_label": "Florence"},
            {"pred": "/corpusB/born_in", "sub_label": "Hugo", "obj_label": "Besancon"}]
    with pytest.raises(ProbeError, match=r"relations '/corpusA/born_in' and '/corpusB/born_in' would both be 'born_in'"):
        open_data(facts=facts_file(tmp_path, rows))
    cased = [{"relation": "born_in", "sub_label": "Dante", "obj_label": "Florence"},
             {"relation": "Born_in", "sub_label": "Hugo", "obj_label": "Besancon"}]
    with pytest.raises(ProbeError, match=r"relations 'Born_in' and 'born_in' .* would share one folder"):
        _ = open_data(facts=facts_file(tmp_path, cased, "cased.jsonl")).relations


def test_a_template_file_key_with_a_separator_is_refused(tmp_path):
    from probe.errors import ProbeError
    from probe.template_files import parse_template_file

    path = tmp_path / "t.txt"
    path.write_text("corpus/P19: [X] was born in [Y] .\n")
    with pytest.raises(ProbeError, match=r"t\.txt:1: expected 'KEY: TEMPLATE'"):
        parse_template_file(path)


def test_a_lama_folder_relation_that_cannot_be_a_folder_is_refused(tmp_path):
    from probe.data import open_data
    from probe.errors import ProbeError

    root = make_fake_lama(tmp_path / "lama", relations=[{"relation": "..", "template": "[X] in [Y] .", "label": "x"}])
    with pytest.raises(ProbeError, match=r"relations\.jsonl:1: relation name '\.\.' is a path to a folder"):
        _ = open_data(root).relations


# ---- row 6: one run per folder at a time -----------------------------------------------------------


def test_a_second_run_into_a_folder_being_written_is_refused_and_the_first_is_whole(tmp_path, tiny_causal_dir, fake_lama,
                                                                                    monkeypatch):
    from probe.commands.eval import EvalCell

    out, alone = tmp_path / "run", tmp_path / "alone"
    args = ["eval", "--model", tiny_causal_dir, "-r", "P19,P36", "--data", fake_lama]
    second: list = []
    run = EvalCell.run

    def first_cell_starts_a_second_run(self, loaded):
        if not second:  # while the first run holds its folder, a second process starts into it with other settings
            second.append(run_cli(*args, "--out", out, "--vocab", "objects"))
        return run(self, loaded)

    monkeypatch.setattr(EvalCell, "run", first_cell_starts_a_second_run)
    first = cli_in_process(*args, "--out", out)
    assert first.returncode == 0, first.stderr
    assert_user_error(second[0], f"run folder {out} is being written by another probe run (pid {os.getpid()} on host "
                                 f"{socket.gethostname()})")
    monkeypatch.setattr(EvalCell, "run", run)
    assert cli_in_process(*args, "--out", alone).returncode == 0
    ours, lone = (json.loads((f / "results.json").read_text()) for f in (out, alone))
    assert ours["relations"] == lone["relations"] and ours["summary"] == lone["summary"]
    assert ours["config"]["vocab"] == "common"
    assert not (out / ".probe.lock").exists()  # the lock file goes with the lock


def test_a_sweep_folder_of_the_users_files_is_refused(tmp_path, lama_dir):
    folder = victim(tmp_path)
    grid = tmp_path / "g.toml"
    grid.write_text('model = "smollm2"\nrelations = ["P19"]\n[axes]\nmethod = ["ptuning"]\n')
    assert_user_error(cli_in_process("sweep", grid, "--out", folder, "--data", lama_dir),
                      "holds files that probe did not write (it has no grid.json)")
    assert untouched(folder)


# ---- row 7: a foreign run folder is data, not orders -----------------------------------------------


def test_eval_prompts_never_fetches_the_hub_model_a_folder_names_unless_asked(tmp_path, fake_lama):
    run = tmp_path / "theirs"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "train", "model": "someone/some-model", "model_kind": "causal",
                                                 "data": str(fake_lama), "vocab": "common", "dtype": "float32"}))
    assert_user_error(cli_in_process("eval", "--prompts", run),
                      f"run folder {run} names the hub model 'someone/some-model', which is not on this machine: pass "
                      "--model someone/some-model (or --allow-download)")
    allowed = cli_in_process("eval", "--prompts", run, "--allow-download")  # past the check: offline, so it cannot load
    assert "names the hub model" not in allowed.stderr
    assert f"{run} records model 'someone/some-model', data {fake_lama}, vocab 'common'" in allowed.stdout + allowed.stderr
    assert_user_error(cli_in_process("eval", "--method", "manual", "--allow-download", "-r", "P19", "--data", fake_lama),
                      "--allow-download does not apply")


# ---- row 8: resume checks what it trusts -----------------------------------------------------------


@pytest.mark.parametrize("damage, why", [
    (lambda rel: (rel / "metrics.json").write_text((rel / "metrics.json").read_text()[:40]), "metrics.json does not parse"),
    (lambda rel: (rel / "predictions.jsonl").write_text(""), "predictions.jsonl is empty"),
])
def test_resume_reruns_a_relation_whose_files_are_not_whole(tmp_path, tiny_causal_dir, fake_lama, damage, why):
    out = tmp_path / "run"
    args = ["eval", "--model", tiny_causal_dir, "-r", "P19,P36", "--data", fake_lama, "--out", out]
    assert cli_in_process(*args).returncode == 0
    whole = json.loads((out / "results.json").read_text())
    damage(out / "P36")
    again = cli_in_process(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert f"warning: P36 was marked finished but {why}: it is run again" in again.stdout + again.stderr
    assert json.loads((out / "results.json").read_text())["relations"] == whole["relations"]
    assert len((out / "P36" / "predictions.jsonl").read_text().splitlines()) == whole["relations"][1]["n_facts"]


# ---- row 9: test facts that are train facts are said ------------------------------------------------


def test_test_facts_that_are_also_train_facts_are_warned_and_recorded(tmp_path, tiny_causal_dir):
    x = facts_file(tmp_path, CAPITALS, "capital.jsonl")
    args = ["train", "--train-facts", x, "--facts", x, "--dev-facts", x, "--manual-template", "[X] capital is [Y] .",
            "--model", tiny_causal_dir, "--vocab", "objects", *FAST]
    proc = cli_in_process(*args, "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert ("warning: 3 test facts are also train or dev facts (capital 3 of 3): their figures are not held out; pass "
            "--allow-overlap to accept this") in proc.stdout + proc.stderr
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["overlap"] == {"capital": {"test": 3, "train": 3, "dev": 3, "shared": 3}}
    assert "allow_overlap" not in config
    quiet = cli_in_process(*args, "--out", tmp_path / "b", "--allow-overlap")
    assert "also train or dev facts" not in quiet.stdout + quiet.stderr
    assert json.loads((tmp_path / "b" / "results.json").read_text())["config"]["allow_overlap"] is True


# ---- row 10 and 14: data import reads bounded lines and makes folders with the umask's mode ----------


def lama_zip(path: Path, trex_line: str) -> Path:
    relations = json.dumps({"relation": "P19", "template": "[X] was born in [Y] .", "label": "place of birth",
                            "type": "N-1"})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("data/relations.jsonl", relations + "\n")
        z.writestr("data/TREx/P19.jsonl", trex_line + "\n")
    return path


def test_data_import_refuses_a_line_past_the_bound_without_reading_it_whole(tmp_path):
    line = json.dumps({"sub_label": "x" * 3_000_000, "obj_label": "Paris"})
    source = lama_zip(tmp_path / "data.zip", line)
    assert source.stat().st_size < 100_000  # a small zip that unpacks to a 3 MB line
    assert_user_error(cli_in_process("data", "import", source, "--out", tmp_path / "out"),
                      "TREx/P19.jsonl:1: line longer than 1,000,000 bytes (1 MB)", only_line=False)  # after the bar
    assert not (tmp_path / "out").exists()


def test_an_imported_folder_takes_the_umasks_mode(tmp_path):
    source = lama_zip(tmp_path / "data.zip", json.dumps({"sub_label": "Dante", "obj_label": "Florence"}))
    old = os.umask(0o022)
    try:
        assert cli_in_process("data", "import", source, "--out", tmp_path / "out").returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "trex").stat().st_mode) == 0o755


def test_a_facts_line_past_the_bound_is_refused_with_file_and_line(tmp_path, tiny_causal_dir):
    cap = tmp_path / "cap.jsonl"
    cap.write_text(json.dumps(CAPITALS[0]) + "\n" + json.dumps({"subject": "y" * 1_100_000, "object": "Paris"}) + "\n")
    assert_user_error(cli_in_process("eval", "--facts", cap, "--template", "[X] capital is [Y] .", "--model", tiny_causal_dir,
                                     "--vocab", "objects", "--out", tmp_path / "o"),
                      f"{cap}:2: line longer than 1,000,000 bytes")
    assert not (tmp_path / "o").exists()


# ---- row 11: facts dropped for length say so ---------------------------------------------------------


def test_facts_too_long_for_the_context_are_dropped_for_that_reason(tmp_path, tiny_causal_dir):
    rows = [*CAPITALS, {"subject": " ".join(["France"] * 400), "object": "Paris"}]
    cap = facts_file(tmp_path, rows)
    out = tmp_path / "o"
    proc = cli_in_process("eval", "--facts", cap, "--template", "[X] capital is [Y] .", "--model", tiny_causal_dir,
                          "--vocab", "objects", "--out", out)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "cap" / "metrics.json").read_text())
    assert metrics["n_dropped"] == 1 and metrics["n_facts"] == 3
    assert metrics["dropped_by_reason"] == {"inputs longer than the model's context": 1}
    assert metrics["dropped_reason"] == "inputs longer than the model's context"


def test_a_template_too_long_for_the_context_says_so(tmp_path, tiny_causal_dir):
    cap = facts_file(tmp_path, CAPITALS)
    args = ["train", "--train-facts", cap, "--facts", cap, "--manual-template", "[X] capital is [Y] .", "--model",
            tiny_causal_dir, "--vocab", "objects", "--allow-overlap", *FAST, "--out", tmp_path / "o"]
    assert_user_error(cli_in_process(*args, "--template", "(200, sub, obj)"),
                      "relation cap has no train facts left after filtering (3 inputs longer than the model's context)",
                      only_line=False)
    assert_user_error(cli_in_process(*args, "--template", "(100000, sub, 3, obj)"),
                      "a virtual-token count must be at least 1 and at most 1,024")
    assert not (tmp_path / "o").exists()


# ---- row 12: hostile values get one line, never a traceback ------------------------------------------


def test_hostile_values_get_one_line(tmp_path, tiny_causal_dir, fake_lama):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"subject": "France", "object": "Paris", "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    assert_user_error(cli_in_process("eval", "--facts", deep, "--template", "[X] capital is [Y] .", "--model",
                                     tiny_causal_dir, "--vocab", "objects", "--out", tmp_path / "o"),
                      f"{deep}:1: JSON nested deeper than 64 levels")
    train = ["train", "--model", tiny_causal_dir, "-r", "P19", "--data", fake_lama, *FAST, "--out", tmp_path / "o"]
    assert_user_error(cli_in_process(*train, "--template", f"({10 ** 20}, sub, obj)"),
                      "a virtual-token count must be at least 1 and at most 1,024")
    assert_user_error(cli_in_process(*train, "--lr", "1e38"), "--lr must be a positive number below 1e+30, got 1e+38")
    broken = broken_model(tmp_path, tiny_causal_dir)
    assert_user_error(cli_in_process("eval", "--model", broken, "-r", "P19", "--data", fake_lama, "--out", tmp_path / "o"),
                      f"cannot load model '{broken}'", "model.safetensors", only_line=False)
    assert not (tmp_path / "o").exists()


# ---- row 13: logs are strict JSON ----------------------------------------------------------------------


def test_a_diverged_fit_logs_null_not_nan(tmp_path, tiny_causal_dir, fake_lama):
    out = tmp_path / "o"
    proc = cli_in_process("train", "--model", tiny_causal_dir, "-r", "P36", "--data", fake_lama, *FAST, "--lr", "1e20",
                          "--allow-overlap", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "P36" / "metrics.json").read_text())["fit_failed"] is True

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    rows = [json.loads(line, parse_constant=refuse) for line in (out / "P36" / "train_log.jsonl").read_text().splitlines()]
    flagged = [r for r in rows if r.get("nonfinite")]
    assert flagged and all(r[k] is None for r in flagged for k in r["nonfinite"])
    assert all(k in ("loss", "lr", "grad_norm", "dev_p1", "dev_mrr") for r in flagged for k in r["nonfinite"])


def test_strict_json_names_what_was_not_finite():
    from probe.files import strict_json

    assert strict_json({"step": 3, "loss": float("nan"), "lr": float("inf"), "dev_p1": 1.5}) == {
        "step": 3, "loss": None, "lr": None, "dev_p1": 1.5, "nonfinite": ["loss", "lr"]}
    assert strict_json({"loss": 0.5}) == {"loss": 0.5}


def test_bounded_lines_read_a_line_of_exactly_the_bound(tmp_path):
    from probe.errors import ProbeError
    from probe.files import MAX_LINE_BYTES, bounded_lines

    exact = b"a" * MAX_LINE_BYTES + b"\n" + b"b\n"
    assert [n for n, _ in bounded_lines(io.BytesIO(exact), "f")] == [1, 2]
    with pytest.raises(ProbeError, match=r"^f:1: line longer than 1,000,000 bytes"):
        list(bounded_lines(io.BytesIO(b"a" * (MAX_LINE_BYTES + 1) + b"\n"), "f"))
