"""Fine-tuning (`--method finetune`): every LM weight trains on the manual template, with the one trainer; the LM is
put back after each relation; --save-model; its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, cli_in_process, make_fake_lama, train_here

from probe.backends import load_backend
from probe.batching import relation_facts
from probe.data import LamaData
from probe.evaluator import evaluate_facts
from probe.methods import get_method
from probe.options import load_template_spec
from probe.runs import RunConfig, RunFolder
from probe.templates import compile_template
from probe.trainer import TrainConfig
from probe.vocab import build_candidates

SUBJECTS = ["Dante", "Victor", "Hugo", "Alighieri", "Besancon", "Aaron", "Abbey", "Abraham", "Abel", "Abigail"]
FACTS = {"P36": [(s, "Tokyo") for s in SUBJECTS], "P19": [(s, "Milan") for s in SUBJECTS]}  # one answer each: learnable
VOCAB = ["Paris", "Rome", "Berlin", "Tokyo", "London", "Milan", "Madrid", "Florence"]
FIT = TrainConfig(lr=1e-3, min_steps=60, batch_size=4, epochs=1, eval_every=5, patience=100, seed=3)


@pytest.fixture(scope="module", params=["tiny_causal_dir", "tiny_masked_dir"])
def own_backend(request):
    """A float32 tiny LM of its own (the session's shared backends stay out of the way of a method that trains it)."""
    return load_backend(str(request.getfixturevalue(request.param)), dtype="float32")


def lm_snapshot(backend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


def finetune_run(backend, lama: Path, out: Path, ids=("P36", "P19")) -> dict:
    data = LamaData(lama)
    cands = build_candidates(backend.tokenizer, data.vocab_words("common"))
    config = RunConfig.of("train", backend, data, cands, method="finetune", split="test_34k", vocab="common",
                          batch_size=128, seed=FIT.seed, method_config={}, train=FIT.__dict__).to_dict()
    return train_here(backend, data, list(ids), cands, RunFolder(out, config), "finetune", None, FIT,
                      load_template_spec(None, "finetune"))


def manual_ranks(backend, lama: Path, rid: str) -> list[int]:
    data = LamaData(lama)
    cands = build_candidates(backend.tokenizer, data.vocab_words("common"))
    relation = data.relation(rid)
    facts, _ = relation_facts(data, relation, "test_34k", cands, True)
    compiled = compile_template(relation.template, backend.tokenizer, backend.kind)
    return evaluate_facts(backend, get_method("manual")(0, backend.hidden_size), compiled, facts, cands).ranks


def test_finetune_learns_a_learnable_relation_then_puts_the_lm_back(own_backend, tmp_path):
    lama = make_fake_lama(tmp_path / "lama", FACTS, VOCAB)
    before = lm_snapshot(own_backend)
    manual_before = {rid: manual_ranks(own_backend, lama, rid) for rid in FACTS}
    results = finetune_run(own_backend, lama, tmp_path / "run")
    rows = {r["relation"]: r for r in results["relations"]}
    for rid in FACTS:
        assert rows[rid]["manual_p1"] < 100.0  # the untrained LM does not answer it
        assert rows[rid]["p1"] == 100.0 and rows[rid]["dev_p1"] == 100.0  # fine-tuned, it does
        assert rows[rid]["fit_failed"] is False
        assert rows[rid]["template"] == {"P36": "The capital of [X] is [Y] .", "P19": "[X] was born in [Y] ."}[rid]
    after = lm_snapshot(own_backend)  # every weight as it was, frozen again
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in own_backend.model.parameters())
    # nothing stale in the backend's caches: the manual prompt ranks exactly as before
    assert {rid: manual_ranks(own_backend, lama, rid) for rid in FACTS} == manual_before
    # relations are independent: P19 alone gives what it gave after P36
    alone = finetune_run(own_backend, lama, tmp_path / "alone", ids=("P19",))
    assert alone["relations"][0]["p1"] == rows["P19"]["p1"] and alone["relations"][0]["mrr"] == rows["P19"]["mrr"]
    saved = tmp_path / "run" / "P36"
    assert not (saved / "prompt.safetensors").exists() and not (saved / "model.safetensors").exists()
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["trained_weights"] == sum(p.numel() for p in own_backend.model.parameters())


def test_cli_finetune_saves_the_model_it_tested(tiny_causal_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lama = make_fake_lama(tmp_path / "lama", FACTS, VOCAB)
    out = tmp_path / "run"
    proc = cli_in_process("train", "--method", "finetune", "--model", tiny_causal_dir, "--relation", "P36", "--data", lama,
                   "--out", out, "--lr", "1e-3", "--min-steps", "30", "--batch-size", "4", "--eval-every", "5",
                   "--save-model")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "P36" / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_causal_dir), dtype=torch.float32)
    model.load_state_dict(load_file(out / "P36" / "model.safetensors"))
    from probe.backends import backend_class

    backend = backend_class(model.config, "causal")(model, load_backend(str(tiny_causal_dir)).tokenizer, "saved")
    ranks = manual_ranks(backend, lama, "P36")
    assert 100 * sum(r == 1 for r in ranks) / len(ranks) == metrics["p1"] == 100.0


@pytest.mark.parametrize("flags, fragment", [
    (["--method", "finetune", "--template", "(3, sub, obj)"], "finetune trains the LM on each relation's manual template"),
    (["--method", "finetune", "--dtype", "bfloat16"], "--dtype bfloat16 does not apply"),
    (["--method", "ptuning", "--save-model"], "--save-model applies to methods that train the LM's weights"),
])
def test_finetune_errors_are_one_line(flags, fragment, tiny_causal_dir, tmp_path):
    lama = make_fake_lama(tmp_path / "lama", FACTS, VOCAB)
    proc = cli_in_process("train", "--model", tiny_causal_dir, "--relation", "P36", "--data", lama, "--out", tmp_path / "x",
                   *flags)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "x").exists()
