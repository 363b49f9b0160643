"""probe.explain and `probe explain`: nearest vocabulary tokens of learned virtual vectors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, cli_in_process, make_fake_lama

from probe.errors import ProbeError
from probe.explain import check_explainable, explain_vectors, nearest_tokens
from probe.files import atomic_write_bytes
from probe.methods import METHODS, FixedPrompt
from probe.saved_prompts import prompt_bytes


def _id(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, text
    return ids[0]


def test_nearest_tokens_finds_a_planted_row():
    table = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    vectors = torch.stack([3.0 * table[7], table[21] + 0.01 * table[3]])
    idx, sims = nearest_tokens(vectors, table, k=3)
    assert idx[:, 0].tolist() == [7, 21]
    assert abs(sims[0, 0].item() - 1.0) < 1e-5  # cosine ignores scale
    assert (sims[:, 0] >= sims[:, 1]).all() and (sims[:, 1] >= sims[:, 2]).all()
    banned = torch.ones(50, dtype=torch.bool)
    banned[7] = False
    assert nearest_tokens(vectors, table, 1, banned)[0][0, 0].item() != 7


def test_explain_reports_shared_gold_and_template_neighbours(causal_backend):
    tok = causal_backend.tokenizer
    table = causal_backend.model.get_input_embeddings().weight.detach()
    paris, born, city = _id(tok, " Paris"), _id(tok, " born"), _id(tok, " city")
    vectors = torch.stack([table[paris], table[born], table[city], table[city]])
    info = explain_vectors(tok, table, vectors, 3, gold_objects={"Paris", "Rome"}, template_words={"was", "born", "in"})
    assert [s["ids"][0] for s in info["slots"]] == [paris, born, city, city]
    assert [s["tokens"][0] for s in info["slots"]] == ["ĠParis", "Ġborn", "Ġcity", "Ġcity"]
    assert info["slots_sharing_nearest"] == 2
    assert "ĠParis" in info["gold_neighbours"]
    assert "Ġborn" in info["template_neighbours"] and "ĠParis" not in info["template_neighbours"]
    assert info["mean_top1_similarity"] > 0.999


def _run_folder(tmp_path, tiny_causal_dir, method: str, vectors: torch.Tensor | None, command: str = "train"):
    lama = make_fake_lama(tmp_path / "lama")
    run = tmp_path / "run"
    (run / "P19").mkdir(parents=True)
    config = {"command": command, "method": method, "model": str(tiny_causal_dir), "model_kind": "causal",
              "data": str(lama), "vocab": "common", "split": "test_34k"}
    (run / "config.json").write_text(json.dumps(config))
    if vectors is not None:  # a finished relation: its prompt, then its metrics
        atomic_write_bytes(run / "P19" / "prompt.safetensors", prompt_bytes(FixedPrompt(vectors)))
        (run / "P19" / "metrics.json").write_text(json.dumps({"relation": "P19", "p1": 0.0, "p10": 0.0, "mrr": 0.0}))
    return run


def test_cli_explain_prints_the_planted_neighbour(tmp_path, tiny_causal_dir, causal_backend):
    tok = causal_backend.tokenizer
    table = causal_backend.model.get_input_embeddings().weight.detach()
    vectors = torch.stack([table[_id(tok, " Florence")], table[_id(tok, " born")]])
    run = _run_folder(tmp_path, tiny_causal_dir, "ptuning", vectors)
    proc = cli_in_process("explain", run, "-k", "2")
    assert proc.returncode == 0, proc.stderr
    assert "v0: ĠFlorence 1.00" in proc.stdout and "v1: Ġborn 1.00" in proc.stdout
    assert "gold objects among them: ĠFlorence" in proc.stdout
    saved = json.loads((run / "explain.json").read_text())
    assert saved["k"] == 2 and saved["relations"]["P19"]["slots"][0]["tokens"][0] == "ĠFlorence"


def test_cli_explain_refuses_a_discrete_run(tmp_path, tiny_causal_dir):
    run = _run_folder(tmp_path, tiny_causal_dir, "autoprompt", None)
    assert_user_error(cli_in_process("explain", run), "the method 'autoprompt': its prompt is real tokens", "nothing to explain")
    assert_user_error(cli_in_process("explain", tmp_path / "nowhere"), "not a run folder")
    manual = _run_folder(tmp_path / "eval", tiny_causal_dir, "manual", None, command="eval")
    assert_user_error(cli_in_process("explain", manual), "the method 'manual': its prompt is real tokens", "nothing to explain")


def test_only_training_runs_of_continuous_methods_are_explainable(tmp_path, monkeypatch):
    trained = {name: cls for name, cls in METHODS.items() if cls.can_fit()}
    for name, cls in trained.items():  # refused by the class's `continuous`, not by its name
        config = {"command": "train", "method": name}
        if cls.continuous:
            check_explainable(config, tmp_path)
        else:
            with pytest.raises(ProbeError, match=f"the method {name!r}: (its prompt is real tokens|learns the LM's weights)"):
                check_explainable(config, tmp_path)
    assert [n for n, c in trained.items() if not c.continuous] == ["autoprompt", "finetune"]
    monkeypatch.setattr(METHODS["prompt-tuning"], "continuous", False)  # a discrete method of another name
    with pytest.raises(ProbeError, match="the method 'prompt-tuning': its prompt is real tokens"):
        check_explainable({"command": "train", "method": "prompt-tuning"}, tmp_path)
    for config in ({"command": "eval", "method": "ptuning"},  # an eval run holds no learned vectors
                   {"command": "eval", "method": None, "control": "majority"},
                   {"command": "train", "method": "bogus"}):
        with pytest.raises(ProbeError, match="nothing to explain"):
            check_explainable(config, tmp_path)


def test_cli_explain_skips_a_relation_whose_prompt_is_not_finished(tmp_path, tiny_causal_dir, causal_backend):
    table = causal_backend.model.get_input_embeddings().weight.detach()
    run = _run_folder(tmp_path, tiny_causal_dir, "ptuning", table[:2].clone())
    (run / "P19" / "metrics.json").unlink()  # interrupted between its prompt and its metrics
    assert_user_error(cli_in_process("explain", run), "holds no saved prompts")
