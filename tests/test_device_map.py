"""A model placed over several devices with accelerate's device map scores as the model on one device.

This machine has one device (the CPU), so the splits are forced: a map that names each module (the Llama fast path,
whose activations follow the layers from device to device), and a map that keeps one layer on disk, brought in by
accelerate's hooks as it runs (the transformers forward).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_user_error, cli_in_process

from probe.backends import load_backend
from probe.backends.causal import CausalLM
from probe.backends.llama import LlamaCausalLM
from probe.backends.loading import parse_max_memory
from probe.batching import collate
from probe.data import Fact
from probe.errors import ProbeError
from probe.evaluator import evaluate_facts
from probe.methods import get_method
from probe.templates import compile_template
from probe.vocab import build_candidates

WORDS = ["Paris", "France", "Rome", "Italy", "Berlin", "Germany", "Florence", "London"]
FACTS = [Fact("Dante", "Florence"), Fact("Victor Hugo", "Paris"), Fact("Berlin", "Germany"), Fact("Rome", "Italy")]
MAPS = {
    "each module named": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                          "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
    "a layer on disk": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                        "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"},
}


def scores_of(backend, prompt=None):
    cands = build_candidates(backend.tokenizer, WORDS)
    compiled = compile_template("(2, sub, 1, obj)", backend.tokenizer, "causal")
    batch = collate(compiled, FACTS, cands, backend.pad_id)
    with torch.no_grad():
        inputs = prompt.prompt_inputs() if prompt is not None else get_method("manual")(0, 1).prompt_inputs()
        embeddings = inputs.embeddings if inputs.embeddings is not None else torch.zeros(3, backend.hidden_size)
        (scores,) = backend.score([batch], inputs._replace(embeddings=embeddings), cands)
    return scores, evaluate_facts(backend, None, compile_template("[X] was born in [Y] .", backend.tokenizer, "causal"),
                                  FACTS, cands)


@pytest.mark.parametrize("name", list(MAPS))
def test_a_split_model_scores_as_the_whole_one(tiny_causal_dir, name):
    whole = load_backend(str(tiny_causal_dir))
    split = load_backend(str(tiny_causal_dir), device_map=MAPS[name])
    # named modules on live devices keep the family's fast path; a layer on disk needs the hooks of the plain forward
    assert type(split) is (LlamaCausalLM if name == "each module named" else CausalLM)
    assert str(split.device) == "cpu"  # the prompt goes in where the input embeddings are
    a, ranked_a = scores_of(whole)
    b, ranked_b = scores_of(split)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert ranked_a.ranks == ranked_b.ranks


def test_max_memory_is_read_and_checked():
    assert parse_max_memory("0:70GiB, 1:70GiB,cpu:200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    with pytest.raises(ProbeError, match="expected DEVICE:AMOUNT pairs"):
        parse_max_memory("gpu0=70GiB")


def test_a_bad_max_memory_is_one_error_line_before_any_model_loads(tmp_path, fake_lama):
    proc = cli_in_process("eval", "-r", "P19", "--data", fake_lama, "--model", tmp_path / "no-model", "--max-memory", "lots")
    assert_user_error(proc, "--max-memory 'lots': expected DEVICE:AMOUNT pairs")


def test_the_offload_folder_goes_with_the_model(tiny_causal_dir, tmp_path, monkeypatch):
    """The folder made for weights on disk is removed when the model is freed; nothing else in the temp folder is."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "users-file").write_text("kept")
    split = load_backend(str(tiny_causal_dir), device_map=MAPS["a layer on disk"])
    (made,) = [p.name for p in tmp_path.iterdir() if p.name.startswith("probe-offload-")]
    assert scores_of(split)[0].shape == (len(FACTS), len(WORDS))
    del split
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users-file"], made
