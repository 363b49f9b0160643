"""Training prompts against a frozen LM: the trainer, the pipeline over relations, saved prompts, resume, errors.

Tiny models only (conftest's tiny BERT and tiny Llama, plus a "sharp" tiny BERT built here whose
output actually depends on its input); every test runs in well under a few seconds on CPU.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error, cli_in_process, train_here, write_jsonl
from typer.testing import CliRunner

import cli
import probe.fit
import probe.trainer
from probe.batching import collate, make_batches
from probe.cells import torch_threads
from probe.commands.rerun import reevaluate_run
from probe.data import Fact, LamaData
from probe.errors import Interrupted, ProbeError
from probe.evaluator import evaluate_facts
from probe.files import atomic_write_bytes
from probe.fit import FitTask
from probe.methods import get_method
from probe.methods.prompt_tuning import PromptTuningConfig
from probe.methods.ptuning import PTuningEncoder
from probe.metrics import ranks_of
from probe.options import load_template_spec
from probe.runs import RunConfig, RunFolder
from probe.saved_prompts import load_prompt, prompt_bytes
from probe.templates import DEFAULT_SHAPES, TemplateError, compile_template, parse_template
from probe.trainer import TrainConfig, train_prompt
from probe.vocab import build_candidates

# Single tokens for both tiny tokenizers (WordPiece 'Paris', SmolLM2 ' Paris').
CANDIDATES = ["Paris", "France", "Rome", "Italy", "Berlin", "Germany", "Madrid", "Spain", "London", "England",
              "Tokyo", "Japan", "Lyon", "Milan", "Florence", "French", "Italian", "German", "English"]
SUBJECTS = ["Dante", "Victor", "Hugo", "Alighieri", "Besancon", "Aaron", "Abbey", "Abraham", "Abel", "Abigail",
            "city", "capital", "language", "official", "died", "Victor Hugo"]
MANUAL = "[X] was born in [Y] ."
FAST = TrainConfig(min_steps=0, lr=0.05, batch_size=4, epochs=3, eval_every=1, patience=100, seed=7)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


BACKENDS = ["masked_backend", "sharp_masked_backend", "causal_backend"]


@pytest.fixture(params=BACKENDS)
def any_backend(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["masked_backend", "causal_backend"])
def backend(request):
    return request.getfixturevalue(request.param)


def shape_for(backend) -> str:
    return DEFAULT_SHAPES[backend.kind]


def candidates_for(backend):
    cands = build_candidates(backend.tokenizer, CANDIDATES)
    assert cands.words == CANDIDATES, "every test candidate must be a single token"
    return cands


def lm_snapshot(backend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.model.state_dict(keep_vars=True).items()}


def method_snapshot(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def full_forward_scores(backend, method, batch, candidates) -> torch.Tensor:
    """Candidate scores the slow way: the whole model's logits at batch.target, virtual rows put in by hand."""
    embeds = backend.model.get_input_embeddings()(batch.input_ids).clone()
    virtual = method.virtual_embeddings()
    for i in range(batch.input_ids.shape[0]):
        positions = batch.virtual_mask[i].nonzero().flatten()
        assert len(positions) == method.n_virtual
        if len(positions):
            embeds[i, positions] = virtual.to(embeds.dtype)
    logits = backend.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
    rows = torch.arange(batch.input_ids.shape[0])
    return logits[rows, batch.target][:, candidates.token_ids].float()


def check_target_positions(backend, batch) -> None:
    """The target is [MASK] for a masked LM and the last real token for a causal one."""
    for i in range(batch.input_ids.shape[0]):
        t = int(batch.target[i])
        if backend.kind == "masked":
            row = batch.input_ids[i, : int(batch.attention_mask[i].sum())].tolist()
            assert row.count(backend.tokenizer.mask_token_id) == 1
            assert row[t] == backend.tokenizer.mask_token_id
        else:
            assert t == int(batch.attention_mask[i].sum()) - 1


def constant_object_problem(backend, candidates, manual_compiled):
    """Facts whose object is always the candidate the manual prompt ranks worst: learnable, manual P@1 ~ 0."""
    manual = get_method("manual")(0, backend.hidden_size)
    probe_facts = [Fact(s, w) for s in SUBJECTS[10:] for w in CANDIDATES]
    ev = evaluate_facts(backend, manual, manual_compiled, probe_facts, candidates)
    mean_rank = {w: 0.0 for w in CANDIDATES}
    for f, r in zip(ev.facts, ev.ranks, strict=True):
        mean_rank[f.obj] += r
    x = max(CANDIDATES, key=lambda w: (mean_rank[w], w))
    return [Fact(s, x) for s in SUBJECTS[:10]], [Fact(s, x) for s in SUBJECTS[10:]], x


def learnable_problem(backend):
    """(candidates, train, dev, the manual prompt's dev P@1) of constant_object_problem with the MANUAL template."""
    cands = candidates_for(backend)
    manual_compiled = compile_template(MANUAL, backend.tokenizer, backend.kind)
    train, dev, _ = constant_object_problem(backend, cands, manual_compiled)
    manual_p1 = evaluate_facts(backend, get_method("manual")(0, backend.hidden_size), manual_compiled, dev,
                               cands).metrics["p1"]
    return cands, train, dev, manual_p1


def make_lama(root: Path, splits: dict[str, dict[str, list[tuple[str, str]]]], relations: list[dict] | None = None,
              vocab: list[str] | None = None) -> Path:
    """A LAMA-shaped folder with its own facts per split (conftest's make_fake_lama repeats one set)."""
    relations = relations or [
        {"relation": "P19", "template": "[X] was born in [Y] .", "label": "place of birth", "type": "N-1"},
        {"relation": "P36", "template": "The capital of [X] is [Y] .", "label": "capital", "type": "1-1"},
    ]
    write_jsonl(root / "relations" / "relations.jsonl", relations)
    for split in ("train", "dev", "test_34k"):
        (root / "trex" / split).mkdir(parents=True, exist_ok=True)
        for rid, pairs in splits.get(split, {}).items():
            rows = [{"predicate_id": rid, "sub_label": s, "obj_label": o} for s, o in pairs]
            write_jsonl(root / "trex" / split / f"{rid}.jsonl", rows)
    (root / "vocab").mkdir(parents=True, exist_ok=True)
    (root / "vocab" / "common_vocab_cased.txt").write_text("\n".join(vocab or CANDIDATES) + "\n", encoding="utf-8")
    return root


def default_splits() -> dict:
    def pairs(subjects, objects):
        return [(s, objects[i % len(objects)]) for i, s in enumerate(subjects)]

    return {
        "train": {"P19": pairs(SUBJECTS[:8], ["Paris", "Rome"]), "P36": pairs(SUBJECTS[:8], ["Berlin", "Tokyo"])},
        "dev": {"P19": pairs(SUBJECTS[8:12], ["Paris", "Rome"]), "P36": pairs(SUBJECTS[8:12], ["Berlin", "Tokyo"])},
        "test_34k": {
            "P19": pairs(SUBJECTS[10:], ["Paris", "Rome", "Milan"]) + [("Dante", "Ravenna")],  # not a candidate
            "P36": pairs(SUBJECTS[11:], ["Berlin", "Tokyo", "London"]),
        },
    }


def train_run(backend, lama_root: Path, out: Path, relation_ids=("P19", "P36"), method="ptuning",
              method_config=None, config: TrainConfig = FAST, template=None, resume=False):
    """`probe train`'s cells on a loaded backend; returns (results, run folder, data, candidates)."""
    data = LamaData(lama_root)
    candidates = build_candidates(backend.tokenizer, data.vocab_words("common"))
    cfg = RunConfig.of("train", backend, data, candidates, method=method, split="test_34k", vocab="common",
                       batch_size=128, template_file=template, seed=config.seed,
                       method_config=(method_config.__dict__ if method_config else {}), train=asdict(config)).to_dict()
    run = RunFolder(out, cfg, resume=resume)
    results = train_here(backend, data, relation_ids, candidates, run, method, method_config, config,
                         load_template_spec(template, method))
    return results, run, data, candidates


def spy_training_steps(monkeypatch, backend, fn) -> None:
    """Hand each training step's (batch, scores) to fn, which returns the scores to use; dev evaluations (without
    gradients) pass untouched. Training reaches the scores through `gold_loss`, which calls `score_tokens`."""
    real = backend.score_tokens

    def score(batches, prompt, candidates):
        for batch, scores in zip(batches, real(batches, prompt, candidates), strict=True):
            yield fn(batch.to(backend.device), scores) if torch.is_grad_enabled() else scores

    monkeypatch.setattr(backend, "score_tokens", score)


def leftovers(folder: Path) -> list[str]:
    """Temporary files that an atomic write would have left behind."""
    return sorted(p.name for p in folder.rglob(".*"))


# ---------------------------------------------------------------------------------------------
# Template shapes used for training, on both tokenizers
# ---------------------------------------------------------------------------------------------


def test_default_shape_masked_has_nine_virtual_slots_and_targets_mask(masked_backend):
    tok = masked_backend.tokenizer
    compiled = compile_template("(3, sub, 3, obj, 3)", tok, "masked")
    assert compiled.n_virtual == 9
    sub = tok.encode("Victor Hugo", add_special_tokens=False)
    enc = compiled.encode("Victor Hugo")
    ph = compiled.placeholder_id
    assert ph == tok.unk_token_id
    expected = [tok.cls_token_id, ph, ph, ph, *sub, ph, ph, ph, tok.mask_token_id, ph, ph, ph, tok.sep_token_id]
    assert enc.input_ids == expected
    n = len(sub)
    assert enc.virtual_positions == [1, 2, 3, 4 + n, 5 + n, 6 + n, 8 + n, 9 + n, 10 + n]
    assert enc.target == 7 + n and enc.input_ids[enc.target] == tok.mask_token_id


def test_default_shape_causal_has_six_virtual_slots_and_targets_last(causal_backend):
    tok = causal_backend.tokenizer
    compiled = compile_template("(3, sub, 3, obj)", tok, "causal")
    assert compiled.n_virtual == 6
    sub = tok.encode(" Victor Hugo", add_special_tokens=False)  # a word start after the virtual tokens
    enc = compiled.encode("Victor Hugo")
    ph = compiled.placeholder_id
    p = len(compiled.lead_ids)
    assert enc.input_ids == [*compiled.lead_ids, ph, ph, ph, *sub, ph, ph, ph]
    n = len(sub)
    assert enc.virtual_positions == [p, p + 1, p + 2, p + 3 + n, p + 4 + n, p + 5 + n]
    assert enc.target == len(enc.input_ids) - 1


def test_manual_part_expands_to_the_relation_words(masked_backend, causal_backend):
    tok = masked_backend.tokenizer
    compiled = compile_template("(3, sub, manual, 3, obj, 3)", tok, "masked", manual=MANUAL)
    assert compiled.n_virtual == 9
    enc = compiled.encode("Dante")
    words = tok.encode("was born in", add_special_tokens=False)
    sub = tok.encode("Dante", add_special_tokens=False)
    ph = compiled.placeholder_id
    assert enc.input_ids == [tok.cls_token_id, ph, ph, ph, *sub, *words, ph, ph, ph, tok.mask_token_id,
                             ph, ph, ph, tok.sep_token_id]
    assert enc.input_ids[enc.target] == tok.mask_token_id

    btok = causal_backend.tokenizer
    with pytest.raises(TemplateError, match="obj must be last"):
        compile_template("(3, sub, manual, 3, obj, 3)", btok, "causal", manual=MANUAL)
    ccompiled = compile_template("(3, sub, manual, 3, obj)", btok, "causal", manual=MANUAL)
    assert ccompiled.n_virtual == 6
    cenc = ccompiled.encode("Dante")
    bwords = btok.encode(" was born in", add_special_tokens=False)
    bsub = btok.encode(" Dante", add_special_tokens=False)
    ph = ccompiled.placeholder_id
    assert cenc.input_ids == [*ccompiled.lead_ids, ph, ph, ph, *bsub, *bwords, ph, ph, ph]
    assert cenc.target == len(cenc.input_ids) - 1
    with pytest.raises(TemplateError, match="no relation was given"):
        compile_template("(3, sub, manual, 3, obj, 3)", tok, "masked")


def test_template_file_resolution(tmp_path):
    path = tmp_path / "shapes.txt"
    path.write_text(
        "# shapes for training\n"
        "default: (2, sub, 2, obj, 2)   # every relation\n"
        "default.causal: (2, sub, 2, obj)\n"
        "\n"
        "P19: (3, sub, manual, 3, obj, 3)\n"
        "P19.causal: (3, sub, manual, 3, obj)\n"
        "P36: (1, sub, \"is # not a comment\", 1, obj, 1)\n",
        encoding="utf-8",
    )
    tf = load_template_spec(str(path))
    assert tf.template_for("P37", "masked").source == "(2, sub, 2, obj, 2)"
    assert tf.template_for("P37", "causal").source == "(2, sub, 2, obj)"
    assert tf.template_for("P19", "masked").source == "(3, sub, manual, 3, obj, 3)"
    assert tf.template_for("P19", "causal").source == "(3, sub, manual, 3, obj)"
    p36 = tf.template_for("P36", "causal")
    assert p36.n_virtual == 3 and [p.text for p in p36.parts if p.kind == "text"] == ["is # not a comment"]
    default = load_template_spec(None)
    assert default.template_for("P19", "masked").source == "(3, sub, 3, obj, 3)"
    assert default.template_for("P19", "causal").source == "(3, sub, 3, obj)"
    inline = load_template_spec("(4, sub, obj)")
    assert inline.template_for("P1", "causal").n_virtual == 4


@pytest.mark.parametrize("lines,lineno,fragment", [
    (["default: (3, sub, 3, obj, 3)", "P19 (3, sub, obj)"], 2, "expected 'KEY: TEMPLATE'"),
    (["# c", "", "P19: (3, sub, bogus, obj)"], 3, "unknown word 'bogus'"),
    (["P19: (3, sub, 3, obj)", "P19: (2, sub, obj)"], 2, "set twice"),
    (["default: (3, sub, 3)"], 1, "object exactly once"),
])
def test_template_file_errors_name_file_and_line(tmp_path, lines, lineno, fragment):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TemplateError) as e:
        load_template_spec(str(path))
    assert str(e.value).startswith(f"{path}:{lineno}: ")
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_train_with_bad_template_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("default: (3, sub, 3, obj)\nP19: (3, sub, 3\n", encoding="utf-8")
    res = CliRunner().invoke(cli.app, ["train", "--template", str(path), "--relation", "P19"])
    assert isinstance(res.exception, ProbeError), res.output
    assert str(res.exception).startswith(f"{path}:2: ")


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", BACKENDS)
def test_lm_stays_frozen_and_only_the_method_changes(request, which, monkeypatch):
    backend = request.getfixturevalue(which)
    cands = candidates_for(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    manual = compile_template(MANUAL, backend.tokenizer, backend.kind)
    train, dev, _ = constant_object_problem(backend, cands, manual)
    torch.manual_seed(0)
    method = PTuningEncoder.create(backend, compiled, MANUAL)
    before_lm = lm_snapshot(backend)
    before_method = method_snapshot(method)
    assert all(not p.requires_grad for p in backend.model.parameters())

    seen = []
    spy_training_steps(monkeypatch, backend, lambda batch, scores: seen.append(method_snapshot(method)) or scores)
    result = train_prompt(backend, method, FitTask(compiled, train, dev, cands, FAST))

    after_lm = lm_snapshot(backend)
    assert after_lm.keys() == before_lm.keys()
    for k in before_lm:
        assert torch.equal(after_lm[k], before_lm[k]), k
        assert after_lm[k].dtype == before_lm[k].dtype
    for name, p in backend.model.named_parameters():
        assert p.grad is None, name
        assert not p.requires_grad, name
    # the optimiser moved every method parameter between the first and second training step
    assert result.steps == len(seen) == 3 * 3  # 10 facts, batches of 4, 3 epochs
    first, second = seen[0], seen[1]
    assert same_state(first, before_method)
    for k in first:
        assert not torch.equal(first[k], second[k]), k
    # the method ends with its best-on-dev weights
    assert same_state(method_snapshot(method), before_method) == (result.best_step == 0)
    assert not method.training


@pytest.mark.parametrize("which,method_name", [
    ("causal_backend", "ptuning"), ("causal_backend", "prompt-tuning"), ("causal_backend", "ptuning-mlp"),
    ("sharp_masked_backend", "ptuning"), ("sharp_masked_backend", "prompt-tuning"),
])
def test_training_beats_the_manual_prompt_on_a_learnable_relation(request, which, method_name, tmp_path):
    """Every object is one word that the manual prompt ranks last: a trained prompt learns to put it first."""
    backend = request.getfixturevalue(which)
    cands, train, dev, manual_p1 = learnable_problem(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    torch.manual_seed(0)
    method = get_method(method_name).create(backend, compiled, MANUAL)
    log = tmp_path / "log.jsonl"
    config = TrainConfig(min_steps=0, lr=0.1, batch_size=5, epochs=5, eval_every=2, patience=100, seed=1)
    result = train_prompt(backend, method, FitTask(compiled, train, dev, cands, config, log_path=log))
    assert result.best_dev["p1"] >= manual_p1 + 30, (manual_p1, result)
    assert result.best_step > 0 and result.steps == 10 and not result.stopped_early
    # the method holds the best-on-dev weights: evaluating it again gives best_dev exactly
    assert evaluate_facts(backend, method, compiled, dev, cands).metrics == result.best_dev
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries[0]["step"] == 0 and entries[0]["config"] == asdict(config)
    assert [e["step"] for e in entries] == list(range(11))
    assert [e["step"] for e in entries if "dev_p1" in e] == [0, 2, 4, 6, 8, 10]
    best_entry = next(e for e in entries if e["step"] == result.best_step)
    assert best_entry["dev_p1"] == result.best_dev["p1"]


def test_min_steps_gives_small_relations_more_passes(causal_backend, monkeypatch):
    """10 facts in batches of 4 are 3 steps a pass: min_steps 7 runs three passes and stops at step 7."""

    cands = candidates_for(causal_backend)
    compiled = compile_template(parse_template("(1, sub, 1, obj)"), causal_backend.tokenizer, "causal")
    train = [Fact(s, CANDIDATES[i]) for i, s in enumerate(SUBJECTS[:10])]
    seen = []
    spy_training_steps(monkeypatch, causal_backend, lambda batch, scores: seen.append(batch.facts) or scores)
    config = TrainConfig(min_steps=7, lr=0.01, batch_size=4, epochs=1, eval_every=100, patience=100, seed=1)
    method = get_method("ptuning").create(causal_backend, compiled, MANUAL, None)
    result = train_prompt(causal_backend, method, FitTask(compiled, train, train, cands, config))
    assert result.steps == len(seen) == 7
    for start in (0, 3):  # each pass sees every fact once
        assert sorted((f for b in seen[start:start + 3] for f in b), key=train.index) == train


def test_early_stopping_and_no_improvement_keeps_the_initial_weights(causal_backend, tmp_path):
    backend = causal_backend
    cands = candidates_for(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    train = [Fact(s, "Paris") for s in SUBJECTS[:8]]
    torch.manual_seed(0)
    method = PTuningEncoder.create(backend, compiled, MANUAL)
    before = method_snapshot(method)
    # lr 0: nothing can improve, so patience runs out after two evaluations and the weights stay the start ones
    config = TrainConfig(min_steps=0, lr=0.0, batch_size=2, epochs=5, eval_every=1, patience=2, seed=1)
    result = train_prompt(backend, method, FitTask(compiled, train, train, cands, config))
    assert result.stopped_early and result.steps == 2 and result.best_step == 0
    assert same_state(method_snapshot(method), before)


@pytest.mark.parametrize("which", BACKENDS)
def test_training_loss_is_cross_entropy_at_the_evaluator_target(request, which, monkeypatch, tmp_path):
    """The trainer's scores are the full model's logits at batch.target over the candidates; its loss is their CE."""
    backend = request.getfixturevalue(which)
    cands = candidates_for(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    subjects = [*SUBJECTS[:7], "Victor Hugo", "Dante Alighieri"]  # one- and two-token subjects: padded batches
    facts = [Fact(s, CANDIDATES[i % 5]) for i, s in enumerate(subjects)]
    torch.manual_seed(0)
    method = PTuningEncoder.create(backend, compiled, MANUAL)
    seen, padded = [], []
    candidates, method_ = cands, method

    def checked(batch, scores):
        with torch.no_grad():
            check_target_positions(backend, batch)
            by_hand = full_forward_scores(backend, method_, batch, candidates)
            assert torch.allclose(scores, by_hand, atol=1e-4, rtol=1e-4), (scores - by_hand).abs().max()
            loss = F.cross_entropy(by_hand, batch.gold)
            # the check has teeth: one position off gives other scores
            shifted = copy.copy(batch)
            shifted.target = batch.target - 1
            assert not torch.allclose(full_forward_scores(backend, method_, shifted, candidates), by_hand, atol=1e-4)
        seen.append(loss.item())
        padded.append(not bool(batch.attention_mask.all()))
        return scores

    spy_training_steps(monkeypatch, backend, checked)
    log = tmp_path / "log.jsonl"
    config = TrainConfig(min_steps=0, lr=0.01, batch_size=4, epochs=2, eval_every=100, patience=100, seed=3)
    result = train_prompt(backend, method, FitTask(compiled, facts, facts, cands, config, log_path=log))
    assert result.steps == len(seen) == 6
    assert any(padded) and not all(padded)
    logged = [json.loads(line)["loss"] for line in log.read_text().splitlines()[1:]]
    assert logged == pytest.approx(seen, abs=2e-5)

    # the first batch is the seeded shuffle's first chunk; its logged loss is CE at the target, by hand
    first = make_batches(compiled, facts, cands, 4, backend.pad_id, torch.Generator().manual_seed(3))[0]
    torch.manual_seed(0)
    fresh = PTuningEncoder.create(backend, compiled, MANUAL)
    with torch.no_grad():
        by_hand = F.cross_entropy(full_forward_scores(backend, fresh, first, cands), first.gold).item()
    assert logged[0] == pytest.approx(by_hand, abs=2e-5)


@pytest.mark.parametrize("which", BACKENDS)
def test_evaluate_ranks_come_from_candidate_scores(request, which, monkeypatch):
    backend = request.getfixturevalue(which)
    cands = candidates_for(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    facts = [Fact(s, CANDIDATES[(3 * i) % len(CANDIDATES)]) for i, s in enumerate(SUBJECTS)]
    torch.manual_seed(0)
    method = PTuningEncoder.create(backend, compiled, MANUAL)
    batches = []
    real = backend.score

    def spy(batches_, prompt, candidates):
        for batch, scores in zip(batches_, real(batches_, prompt, candidates), strict=True):
            batches.append((batch, scores))
            yield scores

    monkeypatch.setattr(backend, "score", spy)
    result = evaluate_facts(backend, method, compiled, facts, cands, batch_size=5)
    assert len(batches) == 4
    spied = torch.cat([ranks_of(s, b.gold) for b, s in batches]).tolist()
    assert result.ranks == spied
    assert [f for b, _ in batches for f in b.facts] == result.facts
    # and the same ranks from the full model, one fact at a time (no padding at all)
    with torch.no_grad():
        for fact, rank, top in zip(result.facts, result.ranks, result.top10, strict=True):
            single = collate(compiled, [fact], cands, backend.pad_id)
            scores = full_forward_scores(backend, method, single, cands)
            assert int(ranks_of(scores, single.gold)[0]) == rank
            assert [cands.words[i] for i in scores[0].topk(10).indices.tolist()] == top


def test_same_seed_same_prompt_other_seed_other_prompt(causal_backend, tmp_path):
    backend = causal_backend
    cands = candidates_for(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    manual = compile_template(MANUAL, backend.tokenizer, backend.kind)
    train, dev, _ = constant_object_problem(backend, cands, manual)
    dev = dev + [Fact("Dante", "Rome"), Fact("Hugo", "Lyon")]

    def run(seed: int, name: str):
        config = TrainConfig(min_steps=0, lr=0.02, batch_size=3, epochs=2, eval_every=1, patience=100, seed=seed)
        torch.manual_seed(seed)  # as train_relations does before creating the method
        method = PTuningEncoder.create(backend, compiled, MANUAL)
        result = train_prompt(backend, method, FitTask(compiled, train, dev, cands, config, log_path=tmp_path / name))
        ev = evaluate_facts(backend, method, compiled, dev, cands)
        return method.virtual_embeddings().detach().clone(), result, ev, (tmp_path / name).read_text()

    a = run(11, "a.jsonl")
    b = run(11, "b.jsonl")
    c = run(12, "c.jsonl")
    assert torch.equal(a[0], b[0])
    assert a[1] == b[1]
    assert (a[2].ranks, a[2].top10, a[2].metrics) == (b[2].ranks, b[2].top10, b[2].metrics)
    assert a[3] == b[3]
    assert not torch.equal(a[0], c[0])
    assert a[3] != c[3]


def test_same_init_other_seed_changes_the_shuffle_only(causal_backend):
    backend = causal_backend
    cands = candidates_for(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    facts = [Fact(s, CANDIDATES[i % 4]) for i, s in enumerate(SUBJECTS[:12])]
    torch.manual_seed(0)
    start = PTuningEncoder.create(backend, compiled, MANUAL)
    out = []
    for seed in (1, 1, 2):
        method = copy.deepcopy(start)
        config = TrainConfig(min_steps=0, lr=0.02, batch_size=3, epochs=1, eval_every=100, patience=100, seed=seed)
        train_prompt(backend, method, FitTask(compiled, facts, facts, cands, config))
        out.append(method.virtual_embeddings().detach())
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


def test_max_train_subsamples_deterministically(causal_backend, monkeypatch):
    backend = causal_backend
    cands = candidates_for(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    facts = [Fact(s, CANDIDATES[i % 4]) for i, s in enumerate(SUBJECTS)]
    import probe.trainer

    used = []
    real = probe.trainer.make_batches

    def spy(compiled_, facts_, *a, **k):
        used.append(list(facts_))
        return real(compiled_, facts_, *a, **k)

    monkeypatch.setattr(probe.trainer, "make_batches", spy)
    for _ in range(2):
        torch.manual_seed(0)
        method = PTuningEncoder.create(backend, compiled, MANUAL)
        config = TrainConfig(min_steps=0, lr=0.01, batch_size=2, epochs=1, eval_every=100, patience=100, max_train=5, seed=4)
        result = train_prompt(backend, method, FitTask(compiled, facts, facts[:3], cands, config))
        assert result.steps == 3
    assert len(used) == 2 and used[0] == used[1] and len(used[0]) == 5
    assert all(f in facts for f in used[0])
    assert [facts.index(f) for f in used[0]] == sorted(facts.index(f) for f in used[0])  # file order kept


# ---------------------------------------------------------------------------------------------
# Saving and reloading prompts
# ---------------------------------------------------------------------------------------------


def test_save_prompt_is_atomic_and_round_trips(tmp_path, monkeypatch):
    torch.manual_seed(0)
    method = PTuningEncoder(5, 16)
    path = tmp_path / "P19" / "prompt.safetensors"
    atomic_write_bytes(path, prompt_bytes(method))
    assert sorted(p.name for p in path.parent.iterdir()) == ["prompt.safetensors"]
    loaded = load_prompt(path)
    assert loaded.n_virtual == 5 and loaded.hidden_size == 16
    with torch.no_grad():  # what evaluate_facts computes (no-grad kernels may differ in the last bit)
        assert torch.equal(loaded.virtual_embeddings(), method.virtual_embeddings())
    # the method's own weights are saved beside the embeddings, and rebuild the same output
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    rebuilt = PTuningEncoder(5, 16)
    rebuilt.load_state_dict({k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")})
    with torch.no_grad():
        assert torch.equal(rebuilt.eval().virtual_embeddings(), tensors["virtual_embeddings"])

    # a write that fails half way keeps the old file and leaves no temp file
    old = path.read_bytes()
    import probe.files

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(probe.files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, prompt_bytes(PTuningEncoder(5, 16)))
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir()) == ["prompt.safetensors"]


@pytest.mark.parametrize("content", [
    b"", b"not a safetensors file at all", b"\x00" * 64, "truncated", "no-key", "flipped",
], ids=["empty", "text", "zeros", "truncated", "no-key", "flipped"])
def test_corrupted_prompt_file_is_a_probe_error(tmp_path, content):
    from safetensors.torch import save

    path = tmp_path / "prompt.safetensors"
    atomic_write_bytes(path, prompt_bytes(PTuningEncoder(3, 8)))
    good = path.read_bytes()
    data = {"truncated": good[: len(good) - 7], "no-key": save({"other": torch.zeros(3, 8)}),
            "flipped": good[:8] + b"}" + good[9:]}.get(content, content)
    path.write_bytes(data)
    with pytest.raises(ProbeError) as e:
        load_prompt(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_prompt_file_is_a_probe_error(tmp_path):
    with pytest.raises(ProbeError, match="not a readable prompt file"):
        load_prompt(tmp_path / "nothing.safetensors")


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, masked_backend, causal_backend):
    """kind -> two relations trained with P-tuning into a run folder on that tiny model (trained once, on demand)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            backend = masked_backend if kind == "masked" else causal_backend
            root = tmp_path_factory.mktemp(f"train-{kind}")
            lama = make_lama(root / "lama", default_splits())
            results, run, data, cands = train_run(backend, lama, root / "run")
            cache[kind] = backend, data, cands, run.root, results
        return cache[kind]

    return get


@pytest.fixture(params=["masked", "causal"])
def trained_run(request, trained_runs):
    return trained_runs(request.param)


def test_train_relations_writes_a_complete_run_folder(trained_run):
    backend, data, cands, run_dir, results = trained_run
    assert [r["relation"] for r in results["relations"]] == ["P19", "P36"]
    assert leftovers(run_dir) == []
    for rid in ("P19", "P36"):
        folder = run_dir / rid
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json", "metrics.json", "predictions.jsonl", "prompt.safetensors", "train_log.jsonl"]
        cfg = json.loads((folder / "config.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        assert cfg["relation"] == rid and cfg["method"] == "ptuning" and cfg["method_config"] == {"lstm": True}
        assert cfg["template"] == DEFAULT_SHAPES[backend.kind]
        assert cfg["n_virtual"] == parse_template(DEFAULT_SHAPES[backend.kind]).n_virtual
        assert cfg["hidden_size"] == backend.hidden_size and cfg["model"] == backend.name
        assert cfg["train"] == asdict(FAST) and (cfg["n_train"], cfg["n_dev"]) == (8, 4)
        assert cfg["steps"] == 6
        prompt = load_prompt(folder / "prompt.safetensors")
        assert prompt.virtual_embeddings().shape == (cfg["n_virtual"], backend.hidden_size)
        for k in ("p1", "p10", "mrr", "dev_p1", "dev_mrr", "manual_p1", "manual_mrr", "manual_dev_p1"):
            assert k in metrics, k
        entries = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
        starts = [i for i, e in enumerate(entries) if e["step"] == 0]  # one attempt per start: a retry logs again
        attempts = [entries[i:j] for i, j in zip(starts, [*starts[1:], len(entries)], strict=True)]
        assert [a[0]["config"]["lr"] for a in attempts] == [a["lr"] for a in cfg["attempts"]]
        assert [a["lr"] for a in cfg["attempts"]] == pytest.approx([FAST.lr * 0.1 ** i for i in range(len(attempts))])
        log = attempts[-1]
        assert all([e["step"] for e in a] == list(range(7)) for a in attempts)
        assert max(e["dev_p1"] for e in log) == metrics["dev_p1"]
        # the kept step is the first with the best (dev P@1, dev MRR) if its P@1 rose above the start's, else step 0;
        # a retry only follows a fit that kept step 0
        best = max((e["dev_p1"], e["dev_mrr"]) for e in log)
        rose = best[0] > log[0]["dev_p1"]
        assert cfg["best_step"] == (next(e["step"] for e in log if (e["dev_p1"], e["dev_mrr"]) == best) if rose else 0)
        assert all(a["best_step"] == 0 for a in cfg["attempts"][:-1])
        assert metrics["fit_failed"] == (cfg["best_step"] == 0) == (len(attempts) == 2)
    failed = [r["relation"] for r in results["relations"] if r["fit_failed"]]
    assert results.get("fit_failed", []) == failed
    p19 = json.loads((run_dir / "P19" / "metrics.json").read_text())
    assert (p19["n_facts"], p19["n_dropped"]) == (6, 1)  # Ravenna is no candidate


def test_reevaluate_run_reproduces_saved_metrics_exactly(trained_run):
    backend, data, cands, run_dir, _ = trained_run
    rows = reevaluate_run(backend, data, run_dir, cands)
    assert [r["relation"] for r in rows] == ["P19", "P36"]
    for row in rows:
        saved = json.loads((run_dir / row["relation"] / "metrics.json").read_text())
        for k in ("p1", "p10", "mrr"):
            assert row[k] == saved[k] == row[f"saved_{k}"], (row["relation"], k)
        assert row["n_facts"] == saved["n_facts"]
        config = json.loads((run_dir / row["relation"] / "config.json").read_text())
        assert config["torch_threads"] == torch.get_num_threads()  # what the re-evaluation sets again


def test_torch_threads_sets_the_count_inside_and_puts_it_back():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyboardInterrupt), torch_threads(1):
        raise KeyboardInterrupt
    assert torch.get_num_threads() == before
    with torch_threads(None):  # a run that did not record it: left as it is
        assert torch.get_num_threads() == before


def test_saved_prompt_gives_the_saved_predictions(trained_run):
    backend, data, cands, run_dir, _ = trained_run
    relation = data.relation("P36")
    cfg = json.loads((run_dir / "P36" / "config.json").read_text())
    compiled = compile_template(cfg["template"], backend.tokenizer, backend.kind, manual=relation.template)
    facts = [f for f in data.facts("P36", "test_34k") if f.obj in cands.index]
    ev = evaluate_facts(backend, load_prompt(run_dir / "P36" / "prompt.safetensors"), compiled, facts, cands)
    saved = [json.loads(line) for line in (run_dir / "P36" / "predictions.jsonl").read_text().splitlines()]
    assert ev.predictions() == saved


def test_reevaluate_run_with_a_corrupted_prompt_is_a_probe_error(trained_run, tmp_path):
    backend, data, cands, run_dir, _ = trained_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    (copy_dir / "P36" / "prompt.safetensors").write_bytes(b"\x07garbage")
    with pytest.raises(ProbeError, match="not a readable prompt file"):
        reevaluate_run(backend, data, copy_dir, cands)
    with pytest.raises(ProbeError, match="holds no saved prompts"):
        reevaluate_run(backend, data, tmp_path / "empty", cands)


def test_cli_eval_prompts_reproduces_a_run(trained_runs, monkeypatch):
    backend, data, cands, run_dir, _ = trained_runs("causal")
    monkeypatch.setattr(sys, "argv", ["probe", "eval", "--prompts", str(run_dir)])  # cli reads argv for --model
    res = CliRunner().invoke(cli.app, ["eval", "--prompts", str(run_dir)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "2 of 2 relations reproduce the saved test figures exactly" in res.stdout


def test_cli_eval_prompts_with_another_model_is_one_error_line(trained_runs):
    backend, data, cands, run_dir, _ = trained_runs("causal")
    proc = cli_in_process("eval", "--prompts", run_dir, "--model", "some-other-model")
    assert_user_error(proc, "was trained on model", "some-other-model")


# ---------------------------------------------------------------------------------------------
# Resume after an interruption
# ---------------------------------------------------------------------------------------------


def test_interrupted_training_resumes_without_retraining(causal_backend, tmp_path, monkeypatch):
    backend = causal_backend
    lama = make_lama(tmp_path / "lama", default_splits())
    real = probe.fit.create_prompt
    calls = []

    def interrupt_second(*args, **kwargs):  # Ctrl-C as the second relation's fit begins
        calls.append(args[1].desc)
        if calls[-1].split()[0] != calls[0].split()[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(probe.fit, "create_prompt", interrupt_second)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):  # Ctrl-C: what finished is saved, and the folder to resume is named
        train_run(backend, lama, out)
    assert list(dict.fromkeys(c.split()[0] for c in calls)) == ["P19", "P36"]
    done = out / "P19"
    assert (done / "metrics.json").exists()
    assert load_prompt(done / "prompt.safetensors").n_virtual == 6
    assert not (out / "P36" / "metrics.json").exists() and not (out / "P36" / "prompt.safetensors").exists()
    assert leftovers(out) == []
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.iterdir()}

    calls.clear()

    def count(*args, **kwargs):
        calls.append(args[1].desc)
        return real(*args, **kwargs)

    monkeypatch.setattr(probe.fit, "create_prompt", count)
    with pytest.raises(ProbeError, match="already exists"):
        train_run(backend, lama, out)
    assert calls == []
    results, run, data, cands = train_run(backend, lama, out, resume=True)
    assert calls and all(c.startswith("P36") for c in calls)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.iterdir()} == stamps
    assert [r["relation"] for r in results["relations"]] == ["P19", "P36"]
    assert (out / "P36" / "metrics.json").exists()
    assert load_prompt(out / "P36" / "prompt.safetensors").n_virtual == 6

    # a run that was never interrupted gives the same prompts and metrics, byte for byte
    whole, _, _, _ = train_run(backend, lama, tmp_path / "whole")
    assert whole["relations"] == results["relations"]
    for rid in ("P19", "P36"):
        assert (tmp_path / "whole" / rid / "prompt.safetensors").read_bytes() == \
            (out / rid / "prompt.safetensors").read_bytes()
    rows = reevaluate_run(backend, data, out, cands)
    assert all(r[k] == r[f"saved_{k}"] for r in rows for k in ("p1", "p10", "mrr"))

    # and resuming a finished run trains nothing
    calls.clear()
    train_run(backend, lama, out, resume=True)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_template_without_virtual_tokens_is_refused(masked_backend, tmp_path):
    lama = make_lama(tmp_path / "lama", default_splits())
    with pytest.raises(ProbeError, match="has no virtual tokens") as e:
        train_run(masked_backend, lama, tmp_path / "run", template="[X] was born in [Y] .")
    assert "ptuning" in str(e.value)
    path = tmp_path / "t.txt"
    path.write_text("default: (3, sub, 3, obj, 3)\nP36: The capital of [X] is [Y] .\n")
    with pytest.raises(ProbeError, match="has no virtual tokens"):
        train_run(masked_backend, lama, tmp_path / "run2", relation_ids=["P36"], template=str(path))
    assert not (tmp_path / "run2" / "P36" / "prompt.safetensors").exists()


def test_manual_method_cannot_be_trained(masked_backend, tmp_path):
    """Refused where every fit is resolved (`probe train`, a sweep cell, `probe.train`), before any folder is made."""
    from probe.spec import resolve_fit

    lama = make_lama(tmp_path / "lama", default_splits())
    with pytest.raises(ProbeError, match="method 'manual' has nothing to train: use `probe eval --method manual`"):
        resolve_fit("manual")
    with pytest.raises(ProbeError, match="unknown method"):
        train_run(masked_backend, lama, tmp_path / "run2", method="bogus")


def test_relation_without_train_facts(masked_backend, tmp_path, capsys):
    splits = default_splits()
    splits["train"]["P36"] = [("France", "Ravenna"), ("Italy", "Naples")]  # no candidate object
    lama = make_lama(tmp_path / "lama", splits)
    with pytest.raises(ProbeError, match="P36 has no train facts left after filtering"):
        train_run(masked_backend, lama, tmp_path / "one", relation_ids=["P36"])
    assert not (tmp_path / "one" / "P36" / "metrics.json").exists()
    # with several relations, the empty one is skipped with a warning and the others are trained
    results, *_ = train_run(masked_backend, lama, tmp_path / "two")
    assert [r["relation"] for r in results["relations"]] == ["P19"]
    captured = capsys.readouterr()
    assert "warning: relation P36 has no train facts" in captured.out + captured.err


def test_dev_falls_back_to_train_when_empty(masked_backend, tmp_path):
    splits = default_splits()
    del splits["dev"]["P19"]
    lama = make_lama(tmp_path / "lama", splits)
    _, run, _, _ = train_run(masked_backend, lama, tmp_path / "run", relation_ids=["P19"])
    cfg = json.loads((run.root / "P19" / "config.json").read_text())
    assert cfg["n_dev"] == cfg["n_train"] == 8


@pytest.mark.parametrize("args,fragment", [
    (["train", "--method", "bogus"], "unknown method 'bogus'"),
    (["train", "--init", "bogus", "--method", "prompt-tuning"], "unknown init 'bogus'"),
    (["train", "--method", "manual", "--relation", "P19"], "nothing to train"),
])
def test_cli_train_bad_options_are_one_error_line(args, fragment, tmp_path):
    lama = make_lama(tmp_path / "lama", default_splits())
    extra = ["--data", str(lama)] if "--relation" in args else []
    proc = cli_in_process(*args, *extra, cwd=tmp_path)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "runs").exists()


def test_prompt_tuning_run_saves_and_reproduces(causal_backend, tmp_path):
    """prompt-tuning's virtual embeddings are its parameter itself: saving must copy, not alias, them."""
    lama = make_lama(tmp_path / "lama", default_splits())
    _, run, data, cands = train_run(causal_backend, lama, tmp_path / "run", relation_ids=["P19"],
                                    method="prompt-tuning", method_config=PromptTuningConfig(init="template"))
    from safetensors.torch import load_file

    tensors = load_file(str(run.root / "P19" / "prompt.safetensors"))
    assert torch.equal(tensors["virtual_embeddings"], tensors["method.prompt"])
    cfg = json.loads((run.root / "P19" / "config.json").read_text())
    assert cfg["method"] == "prompt-tuning" and cfg["method_config"] == {"init": "template"}
    (row,) = reevaluate_run(causal_backend, data, run.root, cands)
    assert all(row[k] == row[f"saved_{k}"] for k in ("p1", "p10", "mrr"))


def test_relation_without_test_facts_is_skipped(masked_backend, tmp_path, capsys):
    splits = default_splits()
    splits["test_34k"]["P36"] = [("France", "Ravenna")]  # no candidate object in test
    lama = make_lama(tmp_path / "lama", splits)
    with pytest.raises(ProbeError, match="P36 has no test_34k facts"):
        train_run(masked_backend, lama, tmp_path / "one", relation_ids=["P36"])
    results, run, data, cands = train_run(masked_backend, lama, tmp_path / "run")
    captured = capsys.readouterr()
    assert "warning: relation P36 has no test_34k facts" in captured.out + captured.err
    assert [r["relation"] for r in results["relations"]] == ["P19"]
    assert results["summary"]["all"]["relations"] == 1
    assert not (run.root / "P36" / "prompt.safetensors").exists()
    rows = reevaluate_run(masked_backend, data, run.root, cands)
    assert [r["relation"] for r in rows] == ["P19"]


def test_cli_train_interrupted_then_resumed(tiny_causal_dir, tmp_path, monkeypatch):
    """`probe train` through the CLI, one relation after another (--pack 1): Ctrl-C in the second relation exits 130
    and --resume trains only that one."""
    lama = make_lama(tmp_path / "lama", default_splits())
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_causal_dir), "--dtype", "float32", "--data", str(lama), "--relation", "P19",
            "--relation", "P36", "--out", str(out), "--epochs", "1", "--min-steps", "0", "--batch-size", "4", "--lr", "0.05",
            "--pack", "1"]
    real = probe.fit.create_prompt
    calls = []

    def interrupt_second(*a, **k):
        calls.append(a[1].desc)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(probe.fit, "create_prompt", interrupt_second)
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 130, (res.output, res.exception)
    assert f"interrupted: finished relations are saved in {out}" in res.stderr and "--resume" in res.stderr
    assert (out / "P19" / "metrics.json").exists() and not (out / "P36" / "metrics.json").exists()
    summary = json.loads((out / "results.json").read_text())
    assert [r["relation"] for r in summary["relations"]] == ["P19"]
    stamp = (out / "P19" / "prompt.safetensors").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(probe.fit, "create_prompt", lambda *a, **k: calls.append(a[1].desc) or real(*a, **k))
    res = CliRunner().invoke(cli.app, [*args, "--resume"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert calls and all(c.startswith("P36") for c in calls)
    assert (out / "P19" / "prompt.safetensors").stat().st_mtime_ns == stamp
    summary = json.loads((out / "results.json").read_text())
    assert [r["relation"] for r in summary["relations"]] == ["P19", "P36"]
    assert summary["config"]["command"] == "train" and summary["config"]["method"] == "ptuning"


def test_a_packed_relation_is_saved_as_soon_as_it_finishes(tiny_causal_dir, tmp_path, monkeypatch):
    """Relations trained in one pack are written one by one as each finishes: Ctrl-C while the second is being
    tested keeps the first, and --resume trains only the second."""
    import probe.commands.train as command

    lama = make_lama(tmp_path / "lama", default_splits())
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_causal_dir), "--dtype", "float32", "--data", str(lama), "-r", "P19,P36",
            "--out", str(out), "--epochs", "1", "--min-steps", "0", "--batch-size", "4", "--pack", "2"]
    real = command.TrainCell.finish
    finished = []

    def interrupt_second(self, *a, **k):
        finished.append(self.key)
        if len(finished) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(command.TrainCell, "finish", interrupt_second)
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 130, (res.output, res.exception)
    (first,) = [r["relation"] for r in json.loads((out / "results.json").read_text())["relations"]]
    assert first == finished[0] and not (out / finished[1] / "metrics.json").exists()
    monkeypatch.undo()
    res = CliRunner().invoke(cli.app, [*args, "--resume"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert [r["relation"] for r in json.loads((out / "results.json").read_text())["relations"]] == ["P19", "P36"]


def test_bfloat16_lm_the_cli_default(tiny_causal_dir, tmp_path):
    """With the LM in bfloat16 (the CLI default) the method still trains in float32, and reloads exactly."""
    from probe.backends import load_backend

    backend = load_backend(str(tiny_causal_dir), dtype="bfloat16")
    before = lm_snapshot(backend)
    lama = make_lama(tmp_path / "lama", default_splits())
    _, run, data, cands = train_run(backend, lama, tmp_path / "run", relation_ids=["P19"])
    after = lm_snapshot(backend)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.bfloat16 for k in before)
    assert all(p.grad is None for p in backend.model.parameters())
    assert load_prompt(run.root / "P19" / "prompt.safetensors").virtual_embeddings().dtype == torch.float32
    assert run.config["dtype"] == "bfloat16"
    (row,) = reevaluate_run(backend, data, run.root, cands)
    assert all(row[k] == row[f"saved_{k}"] for k in ("p1", "p10", "mrr"))


# ---------------------------------------------------------------------------------------------
# Resume and split guards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["lr", "init"])
def test_resume_with_other_training_settings_is_refused(masked_backend, tmp_path, change):
    lama = make_lama(tmp_path / "lama", default_splits())
    data = LamaData(lama)
    cands = build_candidates(masked_backend.tokenizer, data.vocab_words("common"))

    def config(lr: float, init: str) -> dict:
        return RunConfig.of("train", masked_backend, data, cands, method="prompt-tuning", split="test_34k",
                            vocab="common", batch_size=128, template_file=None, seed=13, method_config={"init": init},
                            train=asdict(TrainConfig(min_steps=0, lr=lr, seed=13))).to_dict()

    RunFolder(tmp_path / "run", config(3e-3, "vocab")).create()
    other = config(1e-1, "vocab") if change == "lr" else config(3e-3, "random")
    with pytest.raises(ProbeError, match="other settings") as e:
        RunFolder(tmp_path / "run", other, resume=True)
    # only the entries that differ are named, not both settings whole
    differs = "train.lr: 0.003 there, 0.1 asked" if change == "lr" else "method_config.init: 'vocab' there, 'random' asked"
    assert str(e.value) == f"run folder {tmp_path / 'run'} was made with other settings ({differs})"


@pytest.mark.parametrize("split", ["train", "dev"])
def test_cli_train_refuses_a_non_test_split(tiny_causal_dir, tmp_path, split):
    lama = make_lama(tmp_path / "lama", default_splits())
    res = CliRunner().invoke(cli.app, ["train", "--model", str(tiny_causal_dir), "--dtype", "float32", "--data", str(lama),
                                       "--relation", "P19", "--split", split, "--out", str(tmp_path / "run"),
                                       "--epochs", "1", "--min-steps", "0"])
    assert isinstance(res.exception, ProbeError), res.output
    assert "split" in str(res.exception)


# ---------------------------------------------------------------------------------------------
# No silent divergence: a fit whose dev never rises is retried at a lower lr, then flagged
# ---------------------------------------------------------------------------------------------


def test_an_absurd_lr_is_retried_lower_and_the_retry_learns(causal_backend, tmp_path):
    """lr 1e20 turns the prompt into NaN (a real divergence, which once ranked every gold first); the retry at
    lr 1e20 * 1e-21 = 0.1 learns."""
    from probe.trainer import train_with_retries

    backend = causal_backend
    cands, train, dev, manual_p1 = learnable_problem(backend)
    compiled = compile_template(shape_for(backend), backend.tokenizer, backend.kind)
    torch.manual_seed(0)
    method = get_method("ptuning").create(backend, compiled, MANUAL)
    config = TrainConfig(min_steps=0, lr=1e20, batch_size=5, epochs=5, eval_every=2, patience=100, seed=1,
                         retry_lr_factor=1e-21)
    log = tmp_path / "log.jsonl"
    result = train_with_retries(backend, method, FitTask(compiled, train, dev, cands, config, log_path=log))
    assert [a["lr"] for a in result.attempts] == pytest.approx([1e20, 0.1])
    assert result.attempts[0]["best_step"] == 0  # the diverged prompt never beat the start...
    assert not result.failed and result.best_step > 0 and result.best_dev["p1"] >= manual_p1 + 30  # ...the retry did
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["config"]["lr"] for e in entries if e["step"] == 0] == pytest.approx([1e20, 0.1])
    diverged = [e for e in entries[: entries.index(next(e for e in entries[1:] if e["step"] == 0))] if "dev_p1" in e]
    assert [e["dev_p1"] for e in diverged[1:]] == [0.0] * (len(diverged) - 1)  # NaN scores rank every gold last
    assert not method.virtual_embeddings().isnan().any()


def test_a_fit_that_never_rises_is_flagged_in_the_results(masked_backend, tmp_path):
    """lr 0 can learn nothing, at any retry: the relation is flagged, in metrics, results.json and the summary."""
    lama = make_lama(tmp_path / "lama", default_splits())
    config = TrainConfig(min_steps=0, lr=0.0, batch_size=4, epochs=1, eval_every=1, patience=100, seed=7, retries=2)
    with pytest.raises(ProbeError, match="--lr must be a positive number, got 0.0"):
        config.check()  # the CLI refuses lr 0; the pipeline below is handed it directly
    results, run, _, _ = train_run(masked_backend, lama, tmp_path / "run", relation_ids=["P19"], config=config)
    (row,) = results["relations"]
    assert row["fit_failed"] is True and results["fit_failed"] == ["P19"]
    cfg = json.loads((run.root / "P19" / "config.json").read_text())
    assert [a["lr"] for a in cfg["attempts"]] == [0.0, 0.0, 0.0] and all(a["best_step"] == 0 for a in cfg["attempts"])
    assert "**Not trained**" in (run.root / "summary.md").read_text() and "P19" in (run.root / "summary.md").read_text()
    assert list(pd.read_csv(run.root / "relations.csv")["fit_failed"]) == [True]


@pytest.mark.parametrize(("devs", "failed", "kept"), [
    ([(0.0, 0.001), (0.0, 0.004), (0.0, 0.006)], True, 0),  # MRR rises, P@1 never does: not trained
    ([(5.0, 0.2), (5.0, 0.3), (3.0, 0.4)], True, 0),  # P@1 back to its start at best
    ([(0.0, 0.001), (0.0, 0.004), (2.5, 0.003)], False, 2),  # P@1 rose
])
def test_a_fit_is_trained_only_when_dev_p1_rises_above_its_start(devs, failed, kept, tmp_path):
    """The divergence rule reads dev P@1: a fit whose MRR alone improves keeps the starting state, best step 0,
    and counts as failed (so it is retried, then flagged), as P31 and P39 showed in an all-41 run."""
    from probe.trainer import FitLoop

    figures = iter([{"p1": p1, "mrr": mrr} for p1, mrr in devs])
    states = iter(range(len(devs)))
    with FitLoop(lambda: next(figures), lambda: next(states), 0, None, {}, len(devs) - 1, "fit", "step") as fit:
        for step in range(1, len(devs)):
            fit.check(step, {})
    result = fit.result(stopped=False)
    assert result.failed is failed and fit.kept_state == kept and result.best_step == kept
    assert result.best_dev == {"p1": devs[kept][0], "mrr": devs[kept][1]}
