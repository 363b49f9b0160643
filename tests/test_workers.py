"""probe eval --workers: several CPU processes give the results of one, and their errors reach the user."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, run_cli
from typer.testing import CliRunner

import cli
from probe.data import LamaData
from probe.errors import ProbeError
from probe.pipeline import EvalSettings
from probe.runs import RunFolder
from probe.vocab import CandidateVocab
from probe.workers import evaluate_in_workers

RELATIONS = ["P19", "P36", "P37", "P1376", "P140"]


def eval_run(model_dir, lama_dir, out, *extra):
    args = ["eval", "--model", model_dir, "--data", lama_dir, "--out", out, "--dtype", "float32", *extra]
    for rid in RELATIONS:
        args += ["-r", rid]
    res = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return json.loads((out / "results.json").read_text())


def test_two_workers_give_the_results_of_one(tiny_causal_dir, lama_dir, tmp_path):
    one = eval_run(tiny_causal_dir, lama_dir, tmp_path / "one")
    two = eval_run(tiny_causal_dir, lama_dir, tmp_path / "two", "--workers", "2")
    assert [r["relation"] for r in two["relations"]] == sorted(RELATIONS, key=lambda r: int(r[1:]))
    assert two["relations"] == one["relations"]
    assert two["summary"] == one["summary"]
    for rid in RELATIONS:
        assert (tmp_path / "two" / rid / "predictions.jsonl").read_text() == \
            (tmp_path / "one" / rid / "predictions.jsonl").read_text()
    assert sum(r["n_facts"] for r in two["relations"]) > 1000


def test_a_worker_error_stops_the_run_with_its_message(lama_dir, tmp_path):
    data = LamaData(lama_dir)
    run = RunFolder(tmp_path / "run", {"command": "eval"})
    load_args = {"name": str(tmp_path / "no-such-model"), "dtype": "float32"}
    cands = CandidateVocab(["Paris"], torch.tensor([1]), {"Paris": 0}, 1)
    with pytest.raises(ProbeError, match="no-such-model"):
        evaluate_in_workers(load_args, data, ["P19", "P36"], cands, run, EvalSettings(), None, workers=2)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--workers", "2", "--device", "cuda"], "--workers 2 is for CPU evaluation"),
])
def test_bad_workers_are_one_error_line(args, fragment, lama_dir):
    assert_user_error(run_cli("eval", "--all", "--data", lama_dir, *args), fragment)
