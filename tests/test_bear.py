"""BEAR (LM Pub Quiz's layout) and statement scoring, checked against lm-pub-quiz's own `Evaluator`.

The reference runs with LM Pub Quiz's defaults, named here: `Evaluator.from_model(model, tokenizer, model_type=...)`
(so `capitalize=True`, `conditional_score=False`: every token of the statement scored; causal LMs with
`ensure_bos_token_added=True`; masked LMs with `pll_metric="within_word_l2r"`), `evaluate_instance(...,
reduction="sum")` (or "mean"), and for accuracy `evaluate_relation(relation, template_index=t, reduction="sum",
metric="accuracy")`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from probe.data import BearData, open_data
from probe.errors import ProbeError
from probe.statements import gold_ranks, statement_scores

BEAR_FIXTURE = Path(__file__).parent / "fixtures" / "bear"
SHARED_BEAR = Path(__file__).resolve().parents[1].parent / "shared" / "bear"


def lm_pub_quiz_evaluator(backend):
    lpq = pytest.importorskip("lm_pub_quiz")
    model_type = "CLM" if backend.kind == "causal" else "MLM"
    return lpq.Evaluator.from_model(model=backend.model, tokenizer=backend.tokenizer, model_type=model_type,
                                    device="cpu")


def reference_scores(evaluator, template: str, subjects: list[str], answers: list[str], reduction: str = "sum"):
    return torch.tensor([evaluator.evaluate_instance(template=template, answers=answers, subject=s,
                                                     reduction=reduction, batch_size=16) for s in subjects],
                        dtype=torch.float64)


def stable_order(scores: torch.Tensor) -> list[list[int]]:
    """Each row's answers sorted by score, descending, ties in answer order (LM Pub Quiz's `sort_scores`)."""
    return [sorted(range(len(row)), key=lambda i: -row[i]) for row in scores.tolist()]


def test_bear_folder_is_read_as_it_is():
    data = open_data(BEAR_FIXTURE)
    assert isinstance(data, BearData) and list(data.relations) == ["P36", "P37", "P50"]
    rel = data.relation("P50")
    assert rel.templates == ("[X] was written by [Y].", "The author of [X] is [Y].", "[Y] wrote [X].")
    assert rel.answers[:2] == ("Victor Hugo", "Dante Alighieri") and rel.domains == ("Arts",)
    assert [(f.sub, f.obj) for f in data.facts("P50")][:2] == [("Les Misérables", "Victor Hugo"),
                                                              ("the Divine Comedy", "Dante Alighieri")]
    assert data.split_name(None) == "test" and open_data(BEAR_FIXTURE / "BEAR").relations.keys() == data.relations.keys()


def test_a_malformed_bear_folder_is_one_error(tmp_path):
    (tmp_path / "metadata_relations.json").write_text('{"P1": {"templates": ["no slots"], "answer_space_labels": ["a"]}}')
    (tmp_path / "P1.jsonl").write_text('{"sub_label": "x", "answer_idx": 0}\n')
    with pytest.raises(ProbeError, match="one \\[X\\] and one \\[Y\\]"):
        _ = open_data(tmp_path).relations


@pytest.mark.parametrize("kind", ["causal", "masked"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_statement_scores_equal_lm_pub_quiz(kind, reduction, request):
    backend = request.getfixturevalue(f"{kind}_backend")
    evaluator = lm_pub_quiz_evaluator(backend)
    data = open_data(BEAR_FIXTURE)
    for rel in data.relations.values():
        subjects = [f.sub for f in data.facts(rel.id)]
        for template in rel.templates:
            ours = statement_scores(backend, template, subjects, list(rel.answers), reduction, batch_size=3)
            ref = reference_scores(evaluator, template, subjects, list(rel.answers), reduction)
            assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (rel.id, template, (ours - ref).abs().max())
            assert stable_order(ours) == stable_order(ref)


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_accuracy_per_template_equals_lm_pub_quiz(kind, request):
    lpq = pytest.importorskip("lm_pub_quiz")
    backend = request.getfixturevalue(f"{kind}_backend")
    evaluator = lm_pub_quiz_evaluator(backend)
    data = open_data(BEAR_FIXTURE)
    dataset = lpq.Dataset.from_path(str(BEAR_FIXTURE / "BEAR"))
    for relation in dataset:
        rel = data.relation(relation.relation_code)
        facts = data.facts(rel.id)
        gold = torch.tensor([rel.answers.index(f.obj) for f in facts])
        for t, template in enumerate(rel.templates):
            ours = statement_scores(backend, template, [f.sub for f in facts], list(rel.answers))
            accuracy = (gold_ranks(ours, gold) == 1).double().mean().item()
            ref = evaluator.evaluate_relation(relation, template_index=t, reduction="sum", metric="accuracy")
            assert accuracy == pytest.approx(ref.metric_values["accuracy"])


def test_gold_ranks_break_ties_by_answer_order():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    assert gold_ranks(scores, torch.tensor([2, 0])).tolist() == [2, 1]
    assert gold_ranks(scores, torch.tensor([1, 3])).tolist() == [1, 4]


def test_eval_on_a_bear_folder_scores_statements(tiny_causal_dir, causal_backend, tmp_path):
    from conftest import cli_in_process

    from probe.files import read_json

    out = tmp_path / "run"
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "--data", BEAR_FIXTURE, "--all", "--dtype", "float32",
                          "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = read_json(out / "config.json")
    assert config["score"] == "statement" and config["reduction"] == "sum"
    rows = {r["relation"]: r for r in read_json(out / "results.json")["relations"]}
    data = open_data(BEAR_FIXTURE)
    for rid, rel in data.relations.items():
        facts = data.facts(rid)
        gold = torch.tensor([rel.answers.index(f.obj) for f in facts])
        expected = [100 * (gold_ranks(statement_scores(causal_backend, t, [f.sub for f in facts], list(rel.answers)),
                                      gold) == 1).double().mean().item() for t in rel.templates]
        assert rows[rid]["p1_by_template"] == pytest.approx(expected)
        assert rows[rid]["p1"] == pytest.approx(sum(expected) / 3)
    report = read_json(out / "bear.json")
    assert report["macro_accuracy"] == pytest.approx(sum(r["p1"] for r in rows.values()) / 3)
    geo = [rows["P36"], rows["P37"]]  # P37 is in two domains: half its instances count for each (LM Pub Quiz's rule)
    weights = [6, 5 / 2]
    assert report["domains"]["Geographic"]["accuracy"] == pytest.approx(
        sum(w * r["p1"] for w, r in zip(weights, geo, strict=True)) / sum(weights))
    assert (out / "bear.md").read_text().startswith("# Statements")
    assert (out / "templates.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "fragments"), [
    (("--score", "words"), ("--score 'words'", "statement")),
    (("--reduction", "mean", "--score", "object"), ("--reduction applies to --score statement",)),
    (("--reduction", "max"), ("--reduction 'max'", "sum")),
    (("--vocab", "common"), ("--vocab does not apply", "--score statement")),
    (("--method", "ptuning"), ("--method ptuning does not apply",)),
    (("--jobs", "2"), ("--jobs does not apply",)),
    (("--prompts", "no-such-run"), ("run folder no-such-run does not exist",)),
    (("--prompts", "no-such-run", "--vocab", "common"), ("--vocab does not apply to `probe eval --prompts RUN --data BEAR`",)),
])
def test_statement_flags_that_do_not_apply_are_one_error(args, fragments, tmp_path):
    from conftest import assert_user_error, cli_in_process

    out = tmp_path / "run"
    proc = cli_in_process("eval", "--data", BEAR_FIXTURE, "--relation", "P36", "--out", out, *args)
    assert_user_error(proc, *fragments)
    assert not out.exists()


@pytest.mark.integration
def test_smollm2_statements_equal_lm_pub_quiz_on_a_bear_subset(smollm2_dir):
    """SmolLM2 in float32 on the first instance of 2 BEAR relations with 60 answers each (multi-token answers, a
    template with [Y] before [X]), every template. A statement's log-likelihood (about -40 to -100) is a float32 sum
    over 10 to 20 tokens: ours and lm-pub-quiz's differ in the order of float32 sums (its padded rows against our
    prompt and trie), by up to a few 1e-4 (relative 1e-5); lm-pub-quiz against the plain transformers forward of the
    same statements differs as much. So: equal to 1e-4 relative to 10 (atol 1e-4, rtol 1e-5), every two answers
    whose lm-pub-quiz scores are 1e-3 or more apart in the same order, and the same accuracy."""
    if not (SHARED_BEAR / "BEAR").is_dir():
        pytest.skip(f"BEAR is not at {SHARED_BEAR}")
    from probe.backends import load_backend

    backend = load_backend(str(smollm2_dir), dtype="float32")
    evaluator = lm_pub_quiz_evaluator(backend)
    data = open_data(SHARED_BEAR)
    for rid in ("P1376", "P6"):
        rel = data.relation(rid)
        facts = data.facts(rid)[:1]
        gold = torch.tensor([rel.answers.index(f.obj) for f in facts])
        for template in rel.templates:
            subjects = [f.sub for f in facts]
            ours = statement_scores(backend, template, subjects, list(rel.answers))
            ref = reference_scores(evaluator, template, subjects, list(rel.answers))
            assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-5), (rid, template, (ours - ref).abs().max())
            apart = (ref[:, :, None] - ref[:, None, :]).abs() >= 1e-3
            assert torch.equal((ours[:, :, None] > ours[:, None, :])[apart], (ref[:, :, None] > ref[:, None, :])[apart])
            ref_correct = [row.index(max(row)) == g for row, g in zip(ref.tolist(), gold.tolist(), strict=True)]
            assert (gold_ranks(ours, gold) == 1).tolist() == ref_correct



def test_trained_prompts_on_bear(tiny_causal_dir, causal_backend, fake_lama, tmp_path):
    """A prompt trained on (fake) LAMA, evaluated on the BEAR folder's facts and answers of the shared relations;
    the relations only one side has are listed and skipped; the manual templates of both are reported beside it."""
    from conftest import cli_in_process

    from probe.evaluator import evaluate_facts
    from probe.files import read_json
    from probe.objects import object_candidates
    from probe.saved_prompts import load_prompt
    from probe.templates import compile_template

    trained = tmp_path / "trained"
    proc = cli_in_process("train", "--method", "ptuning", "--model", tiny_causal_dir, "--data", fake_lama,
                          "--relation", "P19,P36,P37", "--epochs", "1", "--dtype", "float32", "--objects", "any",
                          "--out", trained)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "on-bear"
    proc = cli_in_process("eval", "--prompts", trained, "--data", BEAR_FIXTURE, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "only in the run: P19" in proc.stderr and "P50" in proc.stderr
    config = read_json(out / "config.json")
    assert config["skipped"] == {"only_in_run": ["P19"], "only_in_data": ["P50"]}
    rows = {r["relation"]: r for r in read_json(out / "results.json")["relations"]}
    assert sorted(rows) == ["P36", "P37"]
    data = open_data(BEAR_FIXTURE)
    for rid, row in rows.items():
        rel, facts = data.relation(rid), data.facts(rid)
        saved = read_json(trained / rid / "config.json")
        candidates = object_candidates(causal_backend.tokenizer, list(rel.answers))
        compiled = compile_template(saved["template"], causal_backend.tokenizer, "causal", manual=saved["manual_template"])
        expected = evaluate_facts(causal_backend, load_prompt(trained / rid / "prompt.safetensors"), compiled, facts,
                                  candidates).metrics
        assert row["p1"] == pytest.approx(expected["p1"]) and row["mrr"] == pytest.approx(expected["mrr"])
        assert row["lama_template"] == saved["manual_template"] and row["bear_templates"] == list(rel.templates)
        gold = torch.tensor([rel.answers.index(f.obj) for f in facts])
        bear = [100 * (gold_ranks(statement_scores(causal_backend, t, [f.sub for f in facts], list(rel.answers)), gold)
                       == 1).double().mean().item() for t in rel.templates]
        assert row["bear_p1_by_template"] == pytest.approx(bear)
    assert (out / "bear_vs_manual.png").stat().st_size > 0 and "LAMA manual (object)" in (out / "bear.md").read_text()


def test_score_object_on_a_bear_folder_ranks_its_answer_space(tiny_causal_dir, tmp_path):
    """--score object keeps today's evaluator: the first template, the relation's answers as --objects any's
    candidates."""
    from conftest import cli_in_process

    from probe.files import read_json

    out = tmp_path / "run"
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "--data", BEAR_FIXTURE, "--relation", "P50", "--score",
                          "object", "--objects", "any", "--dtype", "float32", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_json(out / "config.json")["score"] == "object"
    row = read_json(out / "P50" / "metrics.json")
    assert row["n_candidates"] == 5 and row["n_facts"] == 4 and row["template"] == "[X] was written by [Y]."


def test_score_statement_on_a_lama_folder(tiny_causal_dir, causal_backend, fake_lama, tmp_path):
    """LAMA data as statements: the manual template, the relation's objects as answers, the test split."""
    from conftest import cli_in_process

    from probe.files import read_json

    out = tmp_path / "run"
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "--data", fake_lama, "--relation", "P36", "--score",
                          "statement", "--reduction", "mean", "--dtype", "float32", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = read_json(out / "P36" / "metrics.json")
    facts = open_data(fake_lama).facts("P36", "test")
    answers = list(dict.fromkeys(f.obj for f in facts))
    scores = statement_scores(causal_backend, "The capital of [X] is [Y] .", [f.sub for f in facts], answers, "mean")
    gold = torch.tensor([answers.index(f.obj) for f in facts])
    assert row["n_candidates"] == 3 and row["templates"] == ["The capital of [X] is [Y] ."]
    assert row["p1"] == pytest.approx(100 * (gold_ranks(scores, gold) == 1).double().mean().item())
    assert read_json(out / "config.json")["reduction"] == "mean"


def test_statement_scores_through_the_generic_causal_backend(causal_backend):
    """The transformers forward (KV cache and a 4-D tree mask), not the Llama fast path, gives the same numbers."""
    from probe.backends.base import generic_backend

    generic = generic_backend("causal")(causal_backend.model, causal_backend.tokenizer, "tiny-generic")
    evaluator = lm_pub_quiz_evaluator(causal_backend)
    rel = open_data(BEAR_FIXTURE).relation("P50")
    subjects = [f.sub for f in open_data(BEAR_FIXTURE).facts("P50")]
    for template in rel.templates:
        ours = statement_scores(generic, template, subjects, list(rel.answers))
        ref = reference_scores(evaluator, template, subjects, list(rel.answers))
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (template, (ours - ref).abs().max())
