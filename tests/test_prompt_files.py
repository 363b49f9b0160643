"""probe.prompt_files and `probe eval --prompts-file`: every real prompt format, errors, glued text, ensembles."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, cli_in_process, eval_here, make_fake_lama, write_jsonl
from typer.testing import CliRunner

import cli
from probe.batching import collate
from probe.data import Fact, LamaData
from probe.errors import ProbeError
from probe.evaluator import evaluate_ensemble
from probe.methods.manual import ManualPrompt
from probe.prompt_files import DiscretePrompt, read_prompts
from probe.runs import RunConfig, RunFolder
from probe.templates import compile_template
from probe.vocab import build_candidates

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


# ---- the real files in shared/lama/prompts --------------------------------------------------


@pytest.mark.parametrize("name, fmt, n_relations, n_prompts", [
    ("autoprompt/fact_retrieval_bert_prompts.jsonl", "jsonl", 41, 41),
    ("autoprompt/fact_retrieval_roberta_prompts.jsonl", "jsonl", 41, 41),
    ("autoprompt/optiprompt_AutoPrompt_relations.jsonl", "jsonl", 41, 41),
    ("lpaqa/lpaqa_top1_relations.jsonl", "jsonl", 41, 41),
    ("lpaqa/mine", "folder of P*.jsonl", 41, 1166),
    ("lpaqa/paraphrase", "folder of P*.jsonl", 41, 1073),
    ("lpaqa/manual_paraphrase", "folder of P*.txt", 41, 1018),
    ("pararel", "folder of P*.jsonl", 39, 329),
])
def test_real_prompt_files(lama_dir, name, fmt, n_relations, n_prompts):
    prompts = read_prompts(lama_dir / "prompts" / name)
    assert prompts.format == fmt
    assert len(prompts.prompts) == n_relations
    assert sum(len(p) for p in prompts.prompts.values()) == n_prompts
    assert list(prompts.prompts) == sorted(prompts.prompts, key=lambda r: int(r[1:]))
    prompts.check_relations(LamaData(lama_dir).relations)
    for plist in prompts.prompts.values():
        weights = [p.weight for p in plist]
        if weights[0] is not None:  # LPAQA mine/paraphrase: ranked by weight, highest first
            assert weights == sorted(weights, reverse=True)


def test_real_prompt_files_first_prompts(lama_dir):
    root = lama_dir / "prompts"
    bert = read_prompts(root / "autoprompt/fact_retrieval_bert_prompts.jsonl").prompts
    assert bert["P1001"] == [DiscretePrompt("[X]vik nationwide disabilities policing within [Y].", None,
                                            f"{root}/autoprompt/fact_retrieval_bert_prompts.jsonl:1")]
    assert read_prompts(root / "lpaqa/lpaqa_top1_relations.jsonl").prompts["P19"][0].template == "[X] was born in [Y] ."
    assert read_prompts(root / "pararel").prompts["P19"][0].template == "[X] was born in [Y]."
    assert "P31" not in read_prompts(root / "pararel").prompts
    paraphrase = read_prompts(root / "lpaqa/paraphrase").prompts["P19"]
    assert paraphrase[0].weight == max(p.weight for p in paraphrase)


def test_text_file_of_relation_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\nP19\t[X] was born in [Y] .\n\nP36: The capital of [X] is [Y] .\nP19:[X] is from [Y].\n")
    prompts = read_prompts(path)
    assert prompts.format == "text"
    assert [p.template for p in prompts.prompts["P19"]] == ["[X] was born in [Y] .", "[X] is from [Y]."]
    assert prompts.prompts["P36"][0].where == f"{path}:4"
    assert prompts.chosen(["P19", "P36", "P37"], 1, strict=False) == {
        "P19": prompts.prompts["P19"][:1], "P36": prompts.prompts["P36"]}
    assert len(prompts.chosen(["P19"], 0, strict=True)["P19"]) == 2
    with pytest.raises(ProbeError, match="has no prompt for P37"):
        prompts.chosen(["P19", "P37"], 1, strict=True)


# ---- errors: file and line ------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"relation": "P19", "template": "[X] was born in ."}', "must hold [X] and [Y] once each"),
    ('{"relation": "P19", "template": "[X] was born in [Y] near [Y]."}', "must hold [X] and [Y] once each"),
    ('{"relation": "P19", "template": ""}', "non-empty template"),
    ('{"relation": "19", "template": "[X] was born in [Y] ."}', "relation id like 'P19'"),
    ('{"relation": "P19", "template": "[X] in [Y] .", "weight": -1}', "positive number for 'weight'"),
    ('{"relation": "P19", "template": "[X] in [Y] .", "weight": "high"}', "positive number for 'weight'"),
    ("not json", "malformed JSON line"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"relation": "P36", "template": "The capital of [X] is [Y] ."}\n' + line + "\n")
    with pytest.raises(ProbeError, match="must|expected|malformed") as e:
        read_prompts(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_bad_folder_and_text_lines(tmp_path):
    folder = tmp_path / "mine"
    write_jsonl(folder / "P19.jsonl", [{"template": "[X] was born in [Y] .", "weight": 0.5}, {"template": "[X] lives"}])
    with pytest.raises(ProbeError, match=f"^{folder}/P19.jsonl:2: .*must hold"):
        read_prompts(folder)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "P19.txt").write_text("[X] was born in [Y] .\n\n[Y] [X]\nborn in [Y]\n")
    with pytest.raises(ProbeError, match=f"^{tmp_path}/txt/P19.txt:4: "):
        read_prompts(tmp_path / "txt")
    text = tmp_path / "p.txt"
    text.write_text("P19 [X] was born in [Y] .\n")
    with pytest.raises(ProbeError, match=f"^{text}:1: expected 'P19<TAB>template'"):
        read_prompts(text)
    with pytest.raises(ProbeError, match="not found"):
        read_prompts(tmp_path / "nowhere.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="holds no P"):
        read_prompts(tmp_path / "empty")


def test_unknown_relation_names_file_and_line(tmp_path, fake_lama):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"relation": "P19", "template": "[X] was born in [Y] ."},
                       {"relation": "P999", "template": "[X] is [Y] ."}])
    with pytest.raises(ProbeError, match=f"^{path}:2: relation P999 is not a T-REx relation"):
        read_prompts(path).check_relations(LamaData(fake_lama).relations)


def test_cli_bad_prompt_file_is_one_error_line(tmp_path, fake_lama):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"relation": "P19", "template": "[X] was born in"}])
    proc = cli_in_process("eval", "--model", "no-such-model", "--all", "--data", fake_lama, "--prompts-file", path,
                   "--out", tmp_path / "run")
    assert_user_error(proc, f"{path}:1:", "[X] and [Y]")  # before any model loads
    assert not (tmp_path / "run").exists()


def test_cli_option_errors(tmp_path, fake_lama):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"relation": "P19", "template": "[X] was born in [Y] ."}])
    common = ("eval", "--model", "no-such-model", "--data", fake_lama, "--all")
    for args, message in [
        (("--ensemble",), "need --prompts-file"),
        (("--prompts-file", path, "--max-prompts", "2"), "need --ensemble"),
        (("--prompts-file", path, "--control", "majority"), "--prompts-file does not apply to --control majority"),
    ]:
        res = invoke(*common, *args)
        assert isinstance(res.exception, ProbeError) and message in str(res.exception), res.output
    res = invoke("eval", "--model", "no-such-model", "--data", fake_lama, "--relation", "P36", "--prompts-file", path)
    assert isinstance(res.exception, ProbeError) and "has no prompt for P36" in str(res.exception)


# ---- text glued to [X] ----------------------------------------------------------------------


def test_text_glued_to_subject_is_tokenized_with_it(masked_backend):
    tok = masked_backend.tokenizer
    glued = compile_template("[X]ville was born in [Y].", tok, "masked")
    assert glued.describe("Paris") == "[CLS] Paris ##ville was born in >[MASK]< . [SEP]"
    assert glued.encode("Dante Alighieri").input_ids == tok.encode("Dante Alighieriville was born in [MASK].")
    spaced = compile_template("[X] ville was born in [Y].", tok, "masked")
    assert "##ville" not in spaced.describe("Paris")


def test_text_glued_to_subject_bpe(bpe_tokenizer):
    glued = compile_template("[X]ville was born in [Y]", bpe_tokenizer, "causal")
    enc = glued.encode("Paris")
    assert enc.input_ids == bpe_tokenizer.encode("Parisville was born in", add_special_tokens=False)
    assert enc.target == len(enc.input_ids) - 1


# ---- ensembles ------------------------------------------------------------------------------

ENSEMBLE = ["[X] was born in [Y] .", "The capital of [X] is [Y] .", "[X] is the city of [Y]"]
FACTS = [Fact("Dante", "Florence"), Fact("Victor Hugo", "Paris"), Fact("Italy", "Rome"), Fact("Lyon", "France")]


def test_ensemble_is_the_weighted_mean_of_log_softmax(masked_backend):
    b = masked_backend
    cands = build_candidates(b.tokenizer, ["Paris", "Rome", "Berlin", "Florence", "France", "Italy", "Milan", "Lyon"])
    compiled = [compile_template(t, b.tokenizer, "masked") for t in ENSEMBLE]
    weights = [1.0, 3.0, 4.0]
    method = ManualPrompt(0, b.hidden_size)
    result = evaluate_ensemble(b, method, compiled, weights, FACTS, cands, batch_size=3)
    assert result.facts == FACTS  # an ensemble keeps the facts' order
    for fact, rank, top10 in zip(FACTS, result.ranks, result.top10, strict=True):
        with torch.no_grad():
            per_prompt = [next(b.score([collate(c, [fact], cands, b.pad_id)], method.prompt_inputs(), cands))[0]
                          for c in compiled]
        by_hand = sum(w / 8 * torch.log_softmax(s, dim=0) for w, s in zip(weights, per_prompt, strict=True))
        gold = cands.index[fact.obj]
        assert rank == int((by_hand > by_hand[gold]).sum()) + 1
        assert top10 == [cands.words[i] for i in by_hand.topk(8).indices.tolist()]
    single = evaluate_ensemble(b, method, compiled[:1], [5.0], FACTS, cands)
    manual = evaluate_ensemble(b, method, compiled[:1] * 2, [1.0, 1.0], FACTS, cands)
    assert sorted(single.ranks) == sorted(manual.ranks)  # one prompt twice ranks as the prompt alone


def test_cli_eval_prompts_file_and_ensemble(tmp_path, tiny_masked_dir):
    lama = make_fake_lama(tmp_path / "lama")
    path = tmp_path / "mine"
    write_jsonl(path / "P19.jsonl", [{"template": "[X] is the city of [Y]", "weight": 0.2},
                                     {"template": "[X] was born in [Y] .", "weight": 0.6},
                                     {"template": "[X] died in [Y] .", "weight": 0.1}])
    write_jsonl(path / "P36.jsonl", [{"template": "The capital of [X] is [Y] .", "weight": 1.0}])
    out = tmp_path / "top1"
    res = invoke("eval", "--model", tiny_masked_dir, "--all", "--data", lama, "--prompts-file", path, "--out", out,
                 "--dtype", "float32")
    assert res.exit_code == 0, res.output
    assert "no prompt in" in res.stderr and "P37" in res.stderr
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["method"] == "discrete" and cfg["prompts_file"] == str(path.resolve()) and cfg["ensemble"] is False
    assert cfg["prompts_per_relation"] == {"P19": 1, "P36": 1} and cfg["prompts_format"] == "folder of P*.jsonl"
    assert [r["template"] for r in results["relations"]] == ["[X] was born in [Y] .", "The capital of [X] is [Y] ."]

    manual = tmp_path / "manual"  # the top-1 prompts here are the manual ones: same figures as --method manual
    assert invoke("eval", "--model", tiny_masked_dir, "--relation", "P19", "--relation", "P36", "--data", lama,
                  "--out", manual, "--dtype", "float32").exit_code == 0
    manual_rows = json.loads((manual / "results.json").read_text())["relations"]
    assert [r["p1"] for r in results["relations"]] == [r["p1"] for r in manual_rows]
    assert [r["mrr"] for r in results["relations"]] == [r["mrr"] for r in manual_rows]

    ens = tmp_path / "ens"
    res = invoke("eval", "--model", tiny_masked_dir, "--relation", "P19", "--data", lama, "--prompts-file", path,
                 "--ensemble", "--max-prompts", "2", "--out", ens, "--dtype", "float32")
    assert res.exit_code == 0, res.output
    cfg = json.loads((ens / "config.json").read_text())
    assert cfg["ensemble"] is True and cfg["prompts_per_relation"] == {"P19": 2}
    metrics = json.loads((ens / "P19" / "metrics.json").read_text())
    assert metrics["templates"] == ["[X] was born in [Y] .", "[X] is the city of [Y]"]
    assert metrics["weights"] == [0.6, 0.2]


def test_evaluate_relations_with_prompts(masked_backend, fake_lama, tmp_path):
    b = masked_backend
    data = LamaData(fake_lama)
    cands = build_candidates(b.tokenizer, data.vocab_words())
    prompts = {"P36": [DiscretePrompt("[X] capital [Y] .", None, "x:1"), DiscretePrompt("[Y] of [X]", None, "x:2")]}
    config = RunConfig.of("eval", b, data, cands, method="discrete", split="test_34k", vocab="common", batch_size=128)
    run = RunFolder(tmp_path / "run", config.to_dict())
    results = eval_here(b, data, ["P36"], cands, run, "test_34k", prompts=prompts)
    row = results["relations"][0]
    assert row["templates"] == ["[X] capital [Y] .", "[Y] of [X]"] and row["weights"] == [1.0, 1.0]
    compiled = [compile_template(p.template, b.tokenizer, "masked") for p in prompts["P36"]]
    facts = data.facts("P36")
    expected = evaluate_ensemble(b, ManualPrompt(0, b.hidden_size), compiled, [1.0, 1.0], facts, cands)
    assert row["p1"] == expected.metrics["p1"] and row["mrr"] == expected.metrics["mrr"]
