"""The Python API (probe/api.py) on tiny models: the CLI's figures, no folder without `out=`, trained prompts as
objects, ProbeError with the CLI's messages."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch
from conftest import cli_in_process

import probe
from probe.errors import ProbeError

TRAIN = {"seed": 1, "min_steps": 3, "epochs": 1, "batch_size": 2, "eval_every": 1}


@pytest.fixture(scope="module")
def tiny_model(tiny_causal_dir):
    return probe.load_model(str(tiny_causal_dir), device="cpu")


def test_evaluate_gives_the_figures_of_probe_eval_and_writes_nothing(tiny_model, tiny_causal_dir, fake_lama, tmp_path,
                                                                     monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = probe.evaluate(tiny_model, relations=["P19", "P36"], data=fake_lama, threads=1, predictions=True)
    assert list(work.iterdir()) == []  # no run folder without out=
    proc = cli_in_process("eval", "-m", tiny_causal_dir, "-r", "P19,P36", "--data", fake_lama, "--threads", "1",
                          "--out", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert isinstance(res.relations, pd.DataFrame) and list(res.relations["relation"]) == ["P19", "P36"]
    for row in cli["relations"]:
        ours = res.relations.set_index("relation").loc[row["relation"]]
        assert (ours["p1"], ours["p10"], ours["mrr"], ours["n_facts"]) == (row["p1"], row["p10"], row["mrr"],
                                                                            row["n_facts"])
    assert res.macro_p1 == cli["summary"]["all"]["macro_p1"]
    assert set(res.summary["group"]) >= {"all"}
    preds = [json.loads(x) for x in (tmp_path / "cli" / "P19" / "predictions.jsonl").read_text().splitlines()]
    assert res.predictions["P19"]["rank"].tolist() == [p["rank"] for p in preds]
    # out= writes the CLI's run folder, with the same figures
    again = probe.evaluate(tiny_model, relations=["P19", "P36"], data=fake_lama, threads=1, out=tmp_path / "api")
    assert again.folder == tmp_path / "api" and again.macro_p1 == res.macro_p1
    assert (tmp_path / "api" / "P19" / "predictions.jsonl").read_text() == (tmp_path / "cli" / "P19" /
                                                                           "predictions.jsonl").read_text()


def test_train_gives_the_figures_of_probe_train_and_a_prompt_object(tiny_model, tiny_causal_dir, fake_lama, tmp_path,
                                                                   monkeypatch, caplog):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with caplog.at_level(logging.INFO, logger="probe"):
        res = probe.train(tiny_model, relations="P19", method="prompt-tuning", data=fake_lama, threads=1,
                          init="random", **TRAIN)
    assert list(work.iterdir()) == []
    assert any("P19" in r.getMessage() and "test P@1" in r.getMessage() for r in caplog.records)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]
    proc = cli_in_process("train", "-m", tiny_causal_dir, "--method", "prompt-tuning", "--init", "random", "-r", "P19",
                          "--data", fake_lama, "--threads", "1", "--out", tmp_path / "cli", *flags)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((tmp_path / "cli" / "results.json").read_text())["relations"]
    (ours,) = res.relations.to_dict("records")
    for key in ("p1", "p10", "mrr", "dev_p1", "manual_p1", "manual_dev_p1", "below_manual", "fit_failed", "n_facts"):
        assert ours[key] == row[key], key
    prompt = res.prompts["P19"]
    assert prompt.tensors == (tmp_path / "cli" / "P19" / "prompt.safetensors").read_bytes()
    assert prompt.metrics["p1"] == row["p1"] and prompt.template == "(3, sub, 3, obj)"
    # save and load_prompt: the same prompt; scoring plain Python facts ranks them as the evaluator does
    back = probe.load_prompt(prompt.save(tmp_path / "saved"))
    assert back.tensors == prompt.tensors and back.metrics == prompt.metrics
    scored = back.score(tiny_model, [("Dante", "Florence"), ("Victor", "Paris")], candidates=["Florence", "Paris", "Rome"])
    assert list(scored.columns) == ["subject", "object", "rank", "top10"]
    assert set(scored["rank"]) <= {1, 2, 3} and all(len(t) == 3 for t in scored["top10"])
    assert all(t[r - 1] == o for t, r, o in zip(scored["top10"], scored["rank"], scored["object"], strict=True))
    logits = back.logits(tiny_model, [("Dante", "Florence"), ("Victor", "Paris")], candidates=["Florence", "Paris", "Rome"])
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    gold = torch.tensor([0, 1])
    assert ((logits > logits.gather(1, gold[:, None])).sum(1) + 1).tolist() == scored["rank"].tolist()
    # compare takes run folders and Results written with out=
    cmp = probe.compare([tmp_path / "cli"])
    assert isinstance(cmp.per_relation, pd.DataFrame) and "P19" in set(cmp.per_relation["relation"])


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, d: probe.train(m, relations="P19", data=d, method="manual"), "method 'manual' has nothing to train"),
    (lambda m, d: probe.train(m, relations="P19", data=d, top_k=3), "--top-k does not apply to method 'ptuning'"),
    (lambda m, d: probe.train(m, relations="P19", data=d, fallback="best"), "--fallback 'best': expected manual"),
    (lambda m, d: probe.evaluate(m, relations="P999", data=d), "P999"),
    (lambda m, d: probe.evaluate(m, relations=["P19"], data=d, method="ptuning"), "method 'ptuning' is trained"),
])
def test_mistakes_raise_probe_errors(call, message, tiny_model, fake_lama):
    with pytest.raises(ProbeError, match=message.replace("(", r"\(")):
        call(tiny_model, fake_lama)


def test_import_probe_stays_light():
    """`import probe` loads the API only when it is used (torch and transformers load with it)."""
    import subprocess
    import sys

    code = "import sys, probe; assert 'probe.api' not in sys.modules and 'torch' not in sys.modules; probe.load_model"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _cli_error(*args) -> str:
    """The one `error:` line `probe ARGS` prints (exit 2, no traceback)."""
    from conftest import assert_user_error

    return assert_user_error(cli_in_process(*args))


@pytest.mark.parametrize(("kind", "call", "flags"), [
    (probe.DataError, lambda m, d, t: probe.evaluate(m, relations="P999", data=d), ["eval", "-r", "P999"]),
    (probe.TemplateError, lambda m, d, t: probe.train(m, relations="P19", data=d, template="(3, sub, 3, obj"),
     ["train", "-r", "P19", "--template", "(3, sub, 3, obj"]),
    (probe.TemplateError, lambda m, d, t: probe.train(m, relations="P19", data=d, template="[X] is in [Y] ."),
     ["train", "-r", "P19", "--template", "[X] is in [Y] ."]),
    (probe.RunFolderError, lambda m, d, t: probe.train(m, relations="P19", data=d, out=t / "file.txt"),
     ["train", "-r", "P19", "--out", "{t}/file.txt"]),
    (probe.RunFolderError, lambda m, d, t: probe.evaluate(m, relations="P19", data=d, out=t / "theirs"),
     ["eval", "-r", "P19", "--out", "{t}/theirs"]),
    (probe.SettingError, lambda m, d, t: probe.train(m, relations="P19", data=d, lr=-1.0),
     ["train", "-r", "P19", "--lr", "-1"]),
    (probe.SettingError, lambda m, d, t: probe.train(m, relations="P19", data=d, method="autoprompt", init="nothing"),
     ["train", "-r", "P19", "--method", "autoprompt", "--init", "nothing"]),
    (probe.ModelError, lambda m, d, t: probe.load_model(str(t / "no-model"), device="cpu"),
     ["eval", "-r", "P19", "-m", "{t}/no-model"]),
])
def test_mistakes_raise_their_kind_of_probe_error_with_the_cli_message(kind, call, flags, tiny_model, tiny_causal_dir,
                                                                       fake_lama, tmp_path):
    work = tmp_path / "work"
    (work / "theirs").mkdir(parents=True)
    (work / "file.txt").write_text("mine\n")
    (work / "theirs" / "notes.txt").write_text("not probe's\n")
    with pytest.raises(kind) as caught:
        call(tiny_model, fake_lama, work)
    assert type(caught.value) is kind and isinstance(caught.value, ProbeError)
    flags = [f.format(t=work) for f in flags]
    model = [] if "-m" in flags else ["-m", str(tiny_causal_dir)]
    assert _cli_error(*flags, *model, "--data", fake_lama) == f"error: {caught.value}"
    assert sorted(p.name for p in work.rglob("*")) == ["file.txt", "notes.txt", "theirs"]  # nothing made by either


def test_the_cli_prints_what_the_apis_command_entry_returns(tiny_causal_dir, fake_lama, tmp_path):
    """`probe eval` and `probe train` are probe.api's eval_command / train_command on the flags, then a print."""
    import re

    from probe.api import CommandResult, eval_command, train_command
    from probe.options import Options

    def same(text: str, out) -> str:
        return re.sub(r"\(\d+\.\d+s in all\)", "(Ns in all)", text.replace(str(out), "OUT"))

    for name, entry, flags, extra in (("eval", eval_command, ["-r", "P19,P36"], {"relation": ["P19,P36"]}),
                                      ("train", train_command, ["-r", "P19", "--max-train", "4", "--epochs", "1"],
                                       {"relation": ["P19"], "max_train": 4, "epochs": 1})):
        proc = cli_in_process(name, "-m", tiny_causal_dir, "--data", fake_lama, "--threads", "1", *flags,
                              "--out", tmp_path / f"cli-{name}")
        assert proc.returncode == 0, proc.stderr
        result = entry(Options(model=[str(tiny_causal_dir)], data=str(fake_lama), threads=1, out=tmp_path / f"api-{name}",
                               **extra), log=lambda line: None)
        assert isinstance(result, CommandResult) and len(result.runs) == 1 and result.exit_code == 0
        printed = "\n".join(result.lines()) + "\n"
        # the CLI's stdout: the per-relation lines the cells write as they finish, then what the entry returned
        assert same(proc.stdout, tmp_path / f"cli-{name}").endswith(same(printed, tmp_path / f"api-{name}"))
        assert "saved OUT/results.json, relations.csv, summary.md" in same(printed, tmp_path / f"api-{name}")


def test_evaluate_on_a_bear_folder_scores_statements_as_probe_eval(tiny_model, tiny_causal_dir, tmp_path, monkeypatch):
    from test_bear import BEAR_FIXTURE, lm_pub_quiz_evaluator, reference_scores

    from probe.data import open_data

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = probe.evaluate(tiny_model, data=BEAR_FIXTURE, threads=1, predictions=True)
    assert list(work.iterdir()) == []
    proc = cli_in_process("eval", "-m", tiny_causal_dir, "--data", BEAR_FIXTURE, "--all", "--threads", "1",
                          "--out", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    ours = res.relations.set_index("relation")
    for row in cli["relations"]:
        assert ours.loc[row["relation"], "p1_by_template"] == row["p1_by_template"]
        assert ours.loc[row["relation"], "score"] == "statement"
    assert res.statements == json.loads((tmp_path / "cli" / "bear.json").read_text())
    assert res.predictions["P36"]["pred"].tolist() == [
        json.loads(x)["pred"] for x in (tmp_path / "cli" / "P36" / "predictions.jsonl").read_text().splitlines()]
    # one template's scores in float32, as lm-pub-quiz's Evaluator gives them
    model = probe.load_model(str(tiny_causal_dir), device="cpu", dtype="float32")
    rel = open_data(BEAR_FIXTURE).relation("P36")
    subjects = [f.sub for f in open_data(BEAR_FIXTURE).facts("P36")]
    scores = probe.score_statements(model, rel.templates[1], subjects, list(rel.answers))
    ref = reference_scores(lm_pub_quiz_evaluator(model.backend), rel.templates[1], subjects, list(rel.answers))
    assert scores.shape == (len(subjects), len(rel.answers))
    assert (scores - ref).abs().max().item() < 1e-4
    mean = probe.score_statements(model, rel.templates[1], subjects, list(rel.answers), reduction="mean")
    assert not torch.equal(mean, scores)
    with pytest.raises(probe.SettingError, match="reduction 'max': expected sum"):
        probe.score_statements(model, rel.templates[1], subjects, list(rel.answers), reduction="max")
    with pytest.raises(probe.SettingError, match="--reduction applies to --score statement"):
        probe.evaluate(tiny_model, data=BEAR_FIXTURE, score="object", reduction="mean")


def test_model_data_and_single_tokens_give_what_scripts_need(tiny_model, tiny_causal_dir, fake_lama):
    """The transformers model and tokenizer, a Model around them, the data's relations and facts, single tokens."""
    from conftest import FAKE_FACTS, FAKE_VOCAB

    assert probe.model_folder(str(tiny_causal_dir)) == str(tiny_causal_dir)
    ids = tiny_model.tokenizer("Dante was born in", return_tensors="pt").input_ids
    assert tiny_model.hf_model(input_ids=ids).logits.shape[-1] == tiny_model.hf_model.config.vocab_size
    data = probe.load_data(fake_lama)
    assert set(data.relations) >= {"P19", "P36", "P37"}
    rel = data.relation("P36")
    assert (rel.id, rel.type, rel.template, rel.templates) == ("P36", "1-1", "The capital of [X] is [Y] .",
                                                               ("The capital of [X] is [Y] .",))
    assert data.facts("P19") == list(dict.fromkeys(FAKE_FACTS["P19"]))  # deduplicated, in file order
    assert data.vocab("common") == list(dict.fromkeys(FAKE_VOCAB))
    tokens = probe.single_tokens(tiny_model, data.vocab())
    assert list(tokens) == list(dict.fromkeys(FAKE_VOCAB)) and tokens == probe.single_tokens(tiny_model.tokenizer,
                                                                                              FAKE_VOCAB)
    assert all(tiny_model.tokenizer.decode([i]) == f" {w}" for w, i in tokens.items())
    again = probe.Model.from_hf(tiny_model.hf_model, tiny_model.tokenizer, "again")
    assert again.kind == "causal" and type(again.backend) is type(tiny_model.backend)
    ours = probe.evaluate(again, relations=["P19", "P36"], data=fake_lama, threads=1)
    assert ours.relations["p1"].tolist() == probe.evaluate(tiny_model, relations=["P19", "P36"], data=fake_lama,
                                                           threads=1).relations["p1"].tolist()
