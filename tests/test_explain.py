"""probe.explain and `probe explain`: nearest vocabulary tokens of learned virtual vectors."""

from __future__ import annotations

import json

import torch
from conftest import assert_user_error, make_fake_lama, run_cli

from probe.explain import explain_vectors, nearest_tokens
from probe.methods import FixedPrompt
from probe.pipeline import save_prompt


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
    if vectors is not None:
        save_prompt(run / "P19" / "prompt.safetensors", FixedPrompt(vectors))
    return run


def test_cli_explain_prints_the_planted_neighbour(tmp_path, tiny_causal_dir, causal_backend):
    tok = causal_backend.tokenizer
    table = causal_backend.model.get_input_embeddings().weight.detach()
    vectors = torch.stack([table[_id(tok, " Florence")], table[_id(tok, " born")]])
    run = _run_folder(tmp_path, tiny_causal_dir, "ptuning", vectors)
    proc = run_cli("explain", run, "-k", "2")
    assert proc.returncode == 0, proc.stderr
    assert "v0: ĠFlorence 1.00" in proc.stdout and "v1: Ġborn 1.00" in proc.stdout
    assert "gold objects among them: ĠFlorence" in proc.stdout
    saved = json.loads((run / "explain.json").read_text())
    assert saved["k"] == 2 and saved["relations"]["P19"]["slots"][0]["tokens"][0] == "ĠFlorence"


def test_cli_explain_refuses_a_discrete_run(tmp_path, tiny_causal_dir):
    run = _run_folder(tmp_path, tiny_causal_dir, "autoprompt", None)
    assert_user_error(run_cli("explain", run), "discrete method 'autoprompt'", "nothing to explain")
    assert_user_error(run_cli("explain", tmp_path / "nowhere"), "not a run folder")
    manual = _run_folder(tmp_path / "eval", tiny_causal_dir, "manual", None, command="eval")
    assert_user_error(run_cli("explain", manual), "discrete method 'manual'", "nothing to explain")
