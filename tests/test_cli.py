"""The `probe` command line: output through CliRunner, exit codes and the one-line-error guarantee in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, assert_user_error, cli_in_process, make_fake_lama
from typer.testing import CliRunner

import cli
from probe.errors import ProbeError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


# ---- output ---------------------------------------------------------------------------------


def test_data_info_real_folder_lists_41_relations(lama_dir):
    res = invoke("data", "info", "--data", lama_dir)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["relation", "label", "type", "template", "train", "dev", "test_34k", "test_29k"]
    rows = [ln.split()[0] for ln in lines[1:] if ln.strip().startswith("P")]
    assert len(rows) == 41 and rows[0] == "P17" and rows[-1] == "P1412"
    p19 = next(ln for ln in lines if ln.split()[:1] == ["P19"])
    assert "place of birth" in p19 and "[X] was born in [Y] ." in p19
    assert p19.split()[-4:] == ["800", "200", "944", "780"]
    assert lines[-1] == (f"41 relations in {lama_dir}; facts (deduplicated): "
                         "train 28,920, dev 7,244, test_34k 34,017, test_29k 29,503")


def test_data_info_fake_folder_deduplicates(fake_lama):
    res = invoke("data", "info", "--data", fake_lama)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == (f"3 relations in {fake_lama}; facts (deduplicated): "
                                           "train 10, dev 10, test_34k 10, test_29k 10")  # 3 + 3 + 4


def test_data_info_reads_probe_data(fake_lama, monkeypatch):
    monkeypatch.setenv("PROBE_DATA", str(fake_lama))
    res = invoke("data", "info")
    assert res.exit_code == 0, res.output
    assert f"3 relations in {fake_lama}" in res.stdout


def test_templates_check_lists_entries(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# comment\ndefault: (3, sub, 3, obj)\nP19: [X] was born in [Y] .  # manual\n"
                    "P20: (1, sub, [\"died in\"], obj)\n")
    res = invoke("templates", "check", path)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        "default: (3, sub, 3, obj)  (6 virtual tokens)",
        "P19: [X] was born in [Y] .  (0 virtual tokens)",
        'P20: (1, sub, ["died in"], obj)  (1 virtual tokens, 1 word slots)',
        f"{path}: 3 templates, all valid",
    ]


def test_templates_check_repo_files():
    for name in ("examples.txt", "ptuning.txt", "ptuning_manual.txt"):
        res = invoke("templates", "check", REPO / "templates" / name)
        assert res.exit_code == 0, (name, res.output)
        assert res.stdout.rstrip().endswith("all valid")


def test_templates_show_masked(tmp_path, tiny_masked_dir, fake_lama):
    path = tmp_path / "t.txt"
    path.write_text("default.masked: (2, sub, obj, 1)\nP36: (sub, manual, 1, obj)\n")
    res = invoke("templates", "show", path, "--model", tiny_masked_dir, "--relation", "P19", "--data", fake_lama)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["P19 (place of birth), masked LM: (2, sub, obj, 1)",
                                       "[CLS] [V1] [V2] Dante >[MASK]< [V3] [SEP]"]
    res = invoke("templates", "show", path, "--model", tiny_masked_dir, "--relation", "P36", "--data", fake_lama)
    assert res.stdout.splitlines()[1] == "[CLS] France is [V1] >[MASK]< [SEP]"


def test_eval_tiny_masked_model_writes_run(tmp_path, tiny_masked_dir, fake_lama):
    out = tmp_path / "run"
    res = invoke("eval", "--model", tiny_masked_dir, "--all", "--data", fake_lama, "--out", out,
                 "--dtype", "float32", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    assert "8 of 8 common vocab words are single tokens" in res.stderr
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["model"] == str(tiny_masked_dir) and cfg["model_kind"] == "masked"
    assert cfg["method"] == "manual" and cfg["split"] == "test_34k" and cfg["vocab"] == "common"
    assert cfg["n_candidates"] == 8 and cfg["batch_size"] == 2 and cfg["dtype"] == "float32"
    assert cfg["data"] == str(fake_lama.resolve())
    assert [r["relation"] for r in results["relations"]] == ["P19", "P36", "P37"]
    assert [r["n_facts"] for r in results["relations"]] == [2, 3, 4]
    csv = pd.read_csv(out / "relations.csv")
    assert csv["p1"].tolist() == pytest.approx([r["p1"] for r in results["relations"]])
    assert csv["mrr"].tolist() == pytest.approx([r["mrr"] for r in results["relations"]])
    table = res.stdout.splitlines()
    assert table[0].split() == ["relation", "label", "type", "n_facts", "n_dropped", "p1", "p10", "mrr"]
    assert f"saved {out}/results.json" in res.stdout
    p36 = next(ln for ln in table if ln.split()[:1] == ["P36"])
    assert p36.split()[-3] == f"{results['relations'][1]['p1']:.2f}"

    # the same folder again: refused without --resume, nothing re-evaluated with it
    again = invoke("eval", "--model", tiny_masked_dir, "--all", "--data", fake_lama, "--out", out, "--dtype", "float32")
    assert isinstance(again.exception, ProbeError) and "already exists" in str(again.exception)
    resumed = invoke("eval", "--model", tiny_masked_dir, "--all", "--data", fake_lama, "--out", out,
                     "--dtype", "float32", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "results.json").read_text())["relations"] == results["relations"]
    other = invoke("eval", "--model", tiny_masked_dir, "--all", "--data", fake_lama, "--out", out, "--resume",
                   "--dtype", "float32", "--split", "dev")
    assert isinstance(other.exception, ProbeError)
    assert "split: 'test_34k' there, 'dev' asked" in str(other.exception)


# ---- bad input: exit code 2, one `error:` line, no traceback ---------------------------------


def test_missing_data_folder(tmp_path):
    proc = cli_in_process("data", "info", "--data", tmp_path / "nope")
    assert_user_error(proc, f"error: data folder {tmp_path / 'nope'} not found", "--data", "PROBE_DATA",
                      "probe data import data.zip --out DIR")


def test_incomplete_data_folder(tmp_path):
    root = make_fake_lama(tmp_path / "lama")
    (root / "relations" / "relations.jsonl").unlink()
    assert_user_error(cli_in_process("data", "info", "--data", root), "relations/relations.jsonl is missing")


def test_malformed_json_line(fake_lama):
    path = fake_lama / "trex" / "dev" / "P37.jsonl"
    path.write_text(path.read_text() + '{"sub_label": "Spain", "obj_label": \n')
    assert_user_error(cli_in_process("data", "info", "--data", fake_lama), f"error: {path}:5: malformed JSON line")


def test_unknown_relation_and_split(fake_lama, tmp_path):
    proc = cli_in_process("eval", "--data", fake_lama, "--relation", "P999", "--out", tmp_path / "run")
    assert_user_error(proc, "error: unknown relation 'P999': expected one of the T-REx relations (P19, P36, P37)")
    proc = cli_in_process("eval", "--data", fake_lama, "--relation", "P19", "--split", "validation", "--out", tmp_path / "run")
    assert_user_error(proc, "error: unknown split 'validation'")
    assert not (tmp_path / "run").exists()  # both fail before a model loads or a folder is made


def test_template_file_that_does_not_parse(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("default: (3, sub, 3, obj)\nP19: (3, sub; obj)\n")
    assert_user_error(cli_in_process("templates", "check", path), f"error: {path}:2: ", "at column 8")


def test_template_without_obj(tmp_path):
    path = tmp_path / "noobj.txt"
    path.write_text("# no object slot\ndefault: (3, sub, 3)\n")
    assert_user_error(cli_in_process("templates", "check", path), f"error: {path}:2: ", "must hold the object exactly once")


def test_model_that_cannot_be_found(fake_lama, tmp_path):
    proc = cli_in_process("eval", "--model", "/nonexistent", "--relation", "P19", "--data", fake_lama, "--out", tmp_path / "r")
    assert_user_error(proc, "error: model folder /nonexistent not found: expected a local model folder, a hub id")
    proc = cli_in_process("eval", "--model", tmp_path, "--relation", "P19", "--data", fake_lama, "--out", tmp_path / "r")
    assert_user_error(proc, f"error: cannot load model '{tmp_path}'")  # a folder that exists but holds no model


def test_relation_empty_after_filtering(tmp_path, tiny_masked_dir):
    root = make_fake_lama(tmp_path / "lama", facts={"P19": [("Dante", "Xylophonia"), ("Victor", "Besancon")]})
    proc = cli_in_process("eval", "--model", tiny_masked_dir, "--relation", "P19", "--data", root, "--out", tmp_path / "run")
    # checked before the run folder is made, so the error is the only line and no folder is left behind
    line = assert_user_error(proc)
    assert line == ("error: relation P19 has no test_34k facts left after dropping objects that are not single tokens "
                    "of the candidate vocabulary (2 dropped)")
    assert not (tmp_path / "run").exists()


def test_console_script_gives_the_same_error(tmp_path):
    script = Path(sys.executable).parent / "probe"
    if not script.exists():
        script = shutil.which("probe")
    if not script:
        pytest.skip("the probe console script is not installed")
    path = tmp_path / "bad.txt"
    path.write_text("P19 (3, sub, obj)\n")
    proc = subprocess.run([str(script), "templates", "check", str(path)], capture_output=True, text=True,
                          env={**os.environ}, timeout=120)
    assert_user_error(proc, f"error: {path}:1: expected 'KEY: TEMPLATE'")


def _interrupted_cli():
    """`probe data info` with Ctrl-C pressed while the data folder is read."""
    code = ("import cli, probe.data as d\n"
            "d.LamaData.__init__ = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())\n"
            "cli.main()\n")
    return subprocess.run([sys.executable, "-c", code, "data", "info"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_ctrl_c_exits_130():
    proc = _interrupted_cli()
    assert proc.returncode == 130
    assert "Traceback" not in proc.stderr


def test_ctrl_c_during_eval_keeps_results_and_says_how_to_resume(tmp_path, tiny_masked_dir, fake_lama):
    code = ("import cli, probe.commands.eval as p\n"
            "def stop(*a, **k): raise KeyboardInterrupt()\n"
            "p.EvalCell.run = stop\n"
            "cli.main()\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--model", str(tiny_masked_dir), "--relation", "P36",
                           "--data", str(fake_lama), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"interrupted: finished relations are saved in {out}" in proc.stderr and "--resume" in proc.stderr
    assert (out / "results.json").exists()


def test_batch_size_zero_is_a_user_error(tmp_path, tiny_masked_dir, fake_lama):
    proc = cli_in_process("eval", "--model", tiny_masked_dir, "--relation", "P36", "--data", fake_lama,
                   "--out", tmp_path / "run", "--batch-size", "0")
    assert_user_error(proc, "batch", only_line=False)


def test_negative_batch_size_is_not_a_silent_zero(tmp_path, tiny_masked_dir, fake_lama):
    res = invoke("eval", "--model", tiny_masked_dir, "--relation", "P36", "--data", fake_lama,
                 "--out", tmp_path / "run", "--batch-size", "-1")
    assert isinstance(res.exception, ProbeError)
    assert str(res.exception) == "--batch-size must be at least 1, got -1"


# ---- every flag is honoured or refused --------------------------------------------------------


def error_of(*args) -> str:
    """The ProbeError message a CLI call ends in (it must end in one)."""
    res = invoke(*args)
    assert isinstance(res.exception, ProbeError), (res.exit_code, res.output, res.exception)
    return str(res.exception)


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "--prompts", "RUN", "--split", "dev"], "--split does not apply to `probe eval --prompts`"),
    (["eval", "--prompts", "RUN", "--out", "X", "--vocab", "29k"], "--out, --vocab do not apply to `probe eval --prompts`"),
    (["eval", "--prompts", "RUN", "--dtype", "float32"], "--dtype does not apply to `probe eval --prompts`"),
    (["eval", "--prompts", "RUN", "--method", "manual"], "--method does not apply to `probe eval --prompts`"),
    (["eval", "--prompts", "RUN", "--control", "random-model"], "--control does not apply to `probe eval --prompts`"),
    (["eval", "--template", "(3, sub, obj)", "--all"], "has virtual tokens: a relation's template is real words"),
    (["eval", "--from-sentences", "--template", "[X] is [Y] .", "--all"], "--from-sentences evaluates each fact's cloze"),
    (["eval", "--train-facts", "x.csv", "--all"], "No such option"),
    (["eval", "--method", "majority", "--all"], "majority is a control, not a method: use --control majority"),
    (["eval", "--method", "ptuning", "--all"], "method 'ptuning' is trained: use `probe train --method ptuning`"),
    (["eval", "--seed", "3", "--all"], "--seed applies to --control random-model only"),
    (["eval", "--control", "majority", "--method", "manual", "--all"], "--method does not apply to --control majority"),
    (["eval", "--control", "shuffled", "--all"], "unknown control 'shuffled': expected one of none, random-model, majority"),
    (["train", "--method", "ptuning", "--iterations", "5", "-r", "P19"], "--iterations does not apply to method 'ptuning'"),
    (["train", "--method", "ptuning", "--no-capitals", "-r", "P19"], "--capitals does not apply to method 'ptuning'"),
    (["train", "--method", "autoprompt", "--lr", "0.1", "-r", "P19"], "--lr does not apply to method 'autoprompt'"),
    (["train", "--method", "autoprompt", "--epochs", "2", "--min-steps", "3", "-r", "P19"],
     "--epochs, --min-steps do not apply to method 'autoprompt'"),
    (["train", "--lr", "-0.01", "-r", "P19"], "--lr must be a positive number, got -0.01"),
    (["train", "--epochs", "0", "-r", "P19"], "--epochs must be at least 1, got 0"),
    (["train", "--method", "autoprompt", "--top-k", "0", "-r", "P19"], "--top-k must be at least 1, got 0"),
    (["train", "--control", "majority", "-r", "P19"], "--control 'majority' does not apply to `probe train`"),
    (["train", "--method", "manual", "-r", "P19"], "method 'manual' has nothing to train: use `probe eval --method manual`"),
    (["train", "--method", "autoprompt", "--init", "manual", "--template", "(3, sub, obj)", "-r", "P19"],
     "--init manual builds each relation's template from its manual prompt: drop --template"),
])
def test_a_flag_that_does_not_apply_is_refused_before_anything_loads(args, message, tmp_path, fake_lama):
    """Each of these fails on its flags alone: the model named does not exist, and no folder is made."""
    got = invoke(*args).output if "--train-facts" in args else error_of(*args, "--model", tmp_path / "no-model", "--data",
                                                                         fake_lama)
    assert message in got, got
    assert not list(tmp_path.glob("*run*")) and not (Path.cwd() / "X").exists()


def test_eval_prompts_honours_relation_and_batch_size(tmp_path, fake_lama):
    """--relation picks saved prompts; a relation the run did not train is named in the error."""
    from probe.saved_prompts import saved_relations

    run = tmp_path / "run"
    for rid in ("P19", "P36"):
        (run / rid).mkdir(parents=True)
        (run / rid / "metrics.json").write_text("{}")
        (run / rid / "prompt.safetensors").write_bytes(b"")
    assert saved_relations(run) == ["P19", "P36"]
    (run / "config.json").write_text(json.dumps({"command": "train", "model": "m", "data": str(fake_lama)}))
    missing = error_of("eval", "--prompts", run, "--relation", "P37", "--model", "m")  # --model: the hub model it names
    assert missing == f"{run} has no saved prompt for P37 (it has P19, P36)"
    assert error_of("eval", "--prompts", tmp_path / "nope") == f"run folder {tmp_path / 'nope'} does not exist"


def test_an_existing_out_folder_is_refused_before_the_model_loads(tmp_path, fake_lama):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    for command in ("eval", "train"):
        msg = error_of(command, "--model", tmp_path / "no-model", "-r", "P19", "--data", fake_lama, "--out", out)
        assert msg == f"run folder {out} already exists: pass --resume to continue it, or another --out"


def test_a_comma_list_of_relations(tmp_path, tiny_masked_dir, fake_lama):
    out = tmp_path / "run"
    res = invoke("eval", "--model", tiny_masked_dir, "-r", "P19,P37", "-r", "P36", "--data", fake_lama, "--out", out)
    assert res.exit_code == 0, res.output
    assert [r["relation"] for r in json.loads((out / "results.json").read_text())["relations"]] == ["P19", "P36", "P37"]
    assert error_of("eval", "-r", "P19,P99", "--data", fake_lama) == (
        "unknown relation 'P99': expected one of the T-REx relations (P19, P36, P37)")


def test_majority_control_is_recorded_and_labelled(tmp_path, tiny_masked_dir, fake_lama):
    from probe.comparison import run_label

    out = tmp_path / "run"
    res = invoke("eval", "--model", tiny_masked_dir, "--control", "majority", "-r", "P36", "--data", fake_lama, "--out", out)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["control"] == "majority" and results["config"]["method"] is None
    assert run_label(results["config"]) == "majority"
    (row,) = results["relations"]
    # the fake train facts of P36 are its test facts, each object once: every fact ranks among the 3 seen objects
    assert row["n_train"] == 3 and row["p10"] == 100.0 and row["p1"] == pytest.approx(100 / 3)


def test_version_and_help_texts():
    from probe import __version__

    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"probe {__version__}"
    check = invoke("templates", "check", "--help").stdout
    assert "A template file" in check
    show = invoke("templates", "show", "--help").stdout
    assert "The relation whose first test fact is shown" in show


def test_compare_on_a_missing_path(tmp_path):
    assert error_of("compare", tmp_path / "nope") == (
        f"{tmp_path / 'nope'} does not exist: expected a run folder or a folder of run folders")
