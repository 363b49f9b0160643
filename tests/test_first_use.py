"""What a new user hit (issue 29): refused starts that left blocking folders, tracebacks, file modes, long inputs,
`probe compare --out`, and the smaller things. Each failed before its fix."""

from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import assert_user_error, cli_in_process, make_fake_lama

FAST = ["--epochs", "1", "--min-steps", "0", "--batch-size", "2", "--eval-every", "1", "--dtype", "float32"]


# ---- a refused start never blocks the rerun ------------------------------------------------------


def test_a_train_refused_after_the_model_loads_leaves_no_folder(tmp_path, tiny_causal_dir, fake_lama):
    out = tmp_path / "X"
    args = ["train", "--model", tiny_causal_dir, "-r", "P19", "--data", fake_lama, "--out", out, *FAST]
    assert_user_error(cli_in_process(*args, "--template", "(3, obj, 3, sub)"), "obj must be last for a causal model")
    assert not out.exists()
    rerun = cli_in_process(*args, "--template", "(3, sub, 3, obj)")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "results.json").read_text())["relations"][0]["relation"] == "P19"


def test_an_eval_refused_after_the_model_loads_leaves_no_folder(tmp_path, tiny_causal_dir, fake_lama):
    out = tmp_path / "X"
    args = ["eval", "--model", tiny_causal_dir, "-r", "P19", "--data", fake_lama, "--out", out]
    assert_user_error(cli_in_process(*args, "--template", "[Y] is where [X] was born ."),
                      "obj must be last for a causal model")
    assert not out.exists()
    assert cli_in_process(*args, "--template", "[X] was born in [Y] .").returncode == 0


# ---- one error line, never a traceback ------------------------------------------------------------


@pytest.mark.parametrize(("args", "fragment"), [
    (["eval", "-r", "P19", "--device", "tpu"], "--device 'tpu': expected auto"),
    (["train", "-r", "P19", "--device", "tpu"], "--device 'tpu': expected auto"),
    (["eval", "-r", "P19", "--out", "{file}"], "--out {file} is an existing file: expected a folder"),
    (["train", "-r", "P19", "--out", "{file}"], "--out {file} is an existing file: expected a folder"),
    (["sweep", "{binary}"], "sweep grid {binary} is not UTF-8 text (a binary file?)"),
    (["templates", "check", "{binary}"], "template file {binary} is not UTF-8 text (a binary file?)"),
    (["compare", "{run}", "--out", "{file}"], "--out {file} is an existing file"),
    (["explain", "{run}", "-k", "0"], "error: -k must be at least 1, got 0"),
    (["eval", "-r", "P19", "--threads", "0"], "--threads must be at least 1, got 0"),
])
def test_bad_input_is_one_error_line(args, fragment, tmp_path, fake_lama):
    names = {"file": tmp_path / "a-file", "binary": tmp_path / "binary.toml", "run": tmp_path / "run"}
    names["file"].write_text("not a folder")
    names["binary"].write_bytes(bytes(range(128, 256)) * 4)
    (names["run"]).mkdir()
    (names["run"] / "config.json").write_text(json.dumps({"command": "train", "method": "ptuning"}))
    (names["run"] / "results.json").write_text(json.dumps({"config": {}, "relations": []}))
    filled = [a.format(**names) for a in args]
    extra = ["--data", fake_lama, "--model", tmp_path / "no-model"] if args[0] in ("eval", "train") else []
    assert_user_error(cli_in_process(*filled, *extra), fragment.format(**names))


# ---- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_get_the_umask_mode(tmp_path, tiny_causal_dir, fake_lama, umask, mode):
    old = os.umask(umask)
    try:
        proc = cli_in_process("eval", "--model", tiny_causal_dir, "-r", "P36", "--data", fake_lama, "--out", tmp_path / "r")
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "results.json", "summary.md", "P36/metrics.json", "P36/predictions.jsonl"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == mode, name


# ---- inputs longer than the model's context -------------------------------------------------------


def test_a_fact_longer_than_the_context_is_dropped_with_a_warning(tmp_path, tiny_causal_dir):
    long = "Dante " * 2000  # thousands of tokens; the tiny model's context is 128
    root = make_fake_lama(tmp_path / "lama", facts={"P19": [("Dante", "Florence"), (long.strip(), "Paris"),
                                                            ("Berlin", "Paris")]})
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "-r", "P19", "--data", root, "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    assert ("warning: P19: 1 fact(s) longer than the model's context of 128 tokens dropped, e.g. subject "
            "'Dante Dante Dante Dante Dante Dante Dant...' (") in proc.stderr
    (row,) = json.loads((tmp_path / "r" / "results.json").read_text())["relations"]
    assert (row["n_facts"], row["n_dropped"]) == (2, 1)


# ---- probe compare ---------------------------------------------------------------------------------


def _eval(tmp_path, tiny_causal_dir, fake_lama, name):
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "-r", "P36", "--data", fake_lama, "--out", tmp_path / name)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / name


def test_compare_refuses_an_existing_out_without_force_and_names_unfinished_runs(tmp_path, tiny_causal_dir, fake_lama):
    runs = tmp_path / "runs"
    runs.mkdir()
    _eval(runs, tiny_causal_dir, fake_lama, "done")
    (runs / "half").mkdir()  # a run that never finished: its config, no results.json
    (runs / "half" / "config.json").write_text("{}")
    out = tmp_path / "cmp"
    first = cli_in_process("compare", runs, "--out", out)
    assert first.returncode == 0, first.stderr
    assert f"skipped {runs / 'half'} (no results.json: an unfinished run)" in first.stderr
    written = (out / "compare.csv").read_text()
    (out / "compare.csv").write_text("mine")
    assert_user_error(cli_in_process("compare", runs, "--out", out),
                      f"--out {out} already exists: pass --force to overwrite its comparison")
    assert (out / "compare.csv").read_text() == "mine"
    assert cli_in_process("compare", runs, "--out", out, "--force").returncode == 0
    assert (out / "compare.csv").read_text() == written


# ---- the smaller things ------------------------------------------------------------------------------


def test_templates_check_names_every_bad_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("default: (3, sub, 3, obj)\nP19: (3, sub; obj)\nP20 (sub, obj)\nP36: (sub, 2)\n")
    proc = cli_in_process("templates", "check", path)
    line = assert_user_error(proc, only_line=False)
    assert line == f"error: {path}: 3 lines are not valid templates (listed above)"
    listed = [ln.strip() for ln in proc.stderr.splitlines()[:-1]]
    assert [ln.split(": ")[0] for ln in listed] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_a_relation_with_one_candidate_is_warned_about(tmp_path, tiny_causal_dir):
    root = make_fake_lama(tmp_path / "lama", facts={"P19": [("Dante", "Florence"), ("Victor Hugo", "Florence")]})
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "-r", "P19", "--data", root, "--objects", "any",
                          "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    assert "warning: P19 has 1 candidate(s): every fact ranks it first, so its P@1 is 100 by construction" in proc.stderr


def test_help_shows_flags_as_flags_and_brackets_as_written():
    help_text = cli_in_process("train", "--help").stdout
    assert "probe[ray]" in help_text
    assert "<bool>" not in help_text
    flags = [line.split()[0] for line in help_text.splitlines() if line.strip().startswith("--all")]
    assert flags == ["--all", "--allow-overlap"]  # flags, not --all/--no-all
