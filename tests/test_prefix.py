"""Prefix-tuning: per-layer keys and values at the virtual positions, the MLP folded away at save."""

from __future__ import annotations

import pytest
import torch
from conftest import cli_in_process, model_in_dtype

from probe.backends.causal import CausalLM
from probe.batching import collate
from probe.data import Fact
from probe.errors import ProbeError
from probe.files import atomic_write_bytes
from probe.fit import FitTask
from probe.methods import method_config
from probe.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from probe.saved_prompts import load_prompt, prompt_bytes
from probe.templates import compile_template
from probe.vocab import build_candidates

WORDS = ["Paris", "France", "Rome", "Italy", "Berlin", "Germany", "Madrid", "Spain"]
SUBJECTS = ["Dante", "Victor Hugo", "Berlin", "Italy"]
MANUAL = "[X] was born in [Y] ."


@pytest.fixture(scope="module")
def gpt2_backend(tmp_path_factory, bpe_tokenizer):
    """A tiny GPT-2 (one fused query/key/value projection) on the SmolLM2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from probe.backends import load_backend

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    return load_backend(str(folder))


@pytest.fixture(scope="module")
def slow_causal_backend(causal_backend):
    """The tiny Llama through transformers' own forward instead of the fast path."""
    return CausalLM(causal_backend.model, causal_backend.tokenizer, "tiny-llama-slow")


BACKENDS = ["masked_backend", "causal_backend", "slow_causal_backend", "gpt2_backend"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.getfixturevalue(request.param)


def candidate_scores(backend, method, batch, cands):
    """The backend's scores of one batch for a method's prompt."""
    (scores,) = backend.score([batch], method.prompt_inputs(), cands)
    return scores


def batch_for(backend, template: str, subjects=SUBJECTS):
    compiled = compile_template(template, backend.tokenizer, backend.kind)
    cands = build_candidates(backend.tokenizer, WORDS)
    facts = [Fact(s, "Paris") for s in subjects]
    return compiled, cands, collate(compiled, facts, cands, backend.pad_id)


def test_kv_layout(masked_backend, causal_backend, gpt2_backend):
    assert masked_backend.kv_layout() == (2, 32, 32)  # BERT: hidden 32 for keys and for values
    assert causal_backend.kv_layout() == (2, 32, 32)  # Llama: 2 kv heads x 16
    assert gpt2_backend.kv_layout() == (2, 32, 32)  # GPT-2: slices of the fused c_attn output


def test_prefix_of_the_real_tokens_activations_gives_the_real_tokens_output(backend):
    """Put real words at the virtual slots, record every layer's keys/values there, then hand those to a prefix
    over placeholder slots: the target hidden state must be the same. Fails if any layer's rows are misplaced."""
    template = '(2, sub, "was", obj)' if backend.kind == "causal" else '(2, sub, "was", obj, 1)'
    compiled, _, batch = batch_for(backend, template)
    real_ids = batch.input_ids.clone()
    words = backend.tokenizer.encode(" born in the", add_special_tokens=False)
    n = compiled.n_virtual
    real_ids[batch.virtual_mask] = torch.tensor(words[:n]).repeat(real_ids.shape[0])
    keys, values = backend.token_kv(real_ids)
    with torch.no_grad():
        want = backend.target_hidden(backend.embed(real_ids), batch.attention_mask, batch.target)
        plain = backend.target_hidden(backend.embed(batch.input_ids), batch.attention_mask, batch.target)
        for i in range(real_ids.shape[0]):  # one row at a time: a row's activations depend on its own context
            row = slice(i, i + 1)
            pos = batch.virtual_mask[i].nonzero().flatten()
            with backend.prefix_tuning((keys[:, i, pos], values[:, i, pos]), batch.virtual_mask[row]):
                got = backend.target_hidden(backend.embed(batch.input_ids[row]), batch.attention_mask[row],
                                            batch.target[row])
            torch.testing.assert_close(got, want[row], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-3)  # the placeholders alone differ: the prefix did the work


def test_fast_and_transformers_paths_agree_with_a_prefix(causal_backend, slow_causal_backend):
    compiled, cands, batch = batch_for(causal_backend, '(3, sub, 2, "in", obj)')
    torch.manual_seed(1)
    method = PrefixTuning.create(causal_backend, compiled, MANUAL, PrefixTuningConfig(init="vocab", reparam="none"))
    with torch.no_grad():
        method.flat.add_(torch.randn_like(method.flat))
    fast = candidate_scores(causal_backend, method, batch, cands)
    slow = candidate_scores(slow_causal_backend, method, batch, cands)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    # and gradients reach the prefix through both
    for b in (causal_backend, slow_causal_backend):
        method.zero_grad()
        candidate_scores(b, method, batch, cands).logsumexp(-1).sum().backward()
        assert method.flat.grad is not None and method.flat.grad.abs().sum() > 0


@pytest.mark.parametrize("init", ["random", "vocab", "template"])
def test_init_starts_from_the_words_activations(causal_backend, init):
    compiled = compile_template("(6, sub, obj)", causal_backend.tokenizer, "causal")
    torch.manual_seed(0)
    method = PrefixTuning.create(causal_backend, compiled, MANUAL, PrefixTuningConfig(init=init, reparam="mlp"))
    keys, values = method.prefix()
    assert keys.shape == (2, 6, 32) and values.shape == (2, 6, 32)
    if init == "template":  # the manual words 'was born in', cycled over 6 slots
        ids = causal_backend.tokenizer.encode(" was born in", add_special_tokens=False)
        real_k, real_v = causal_backend.token_kv(torch.tensor([[ids[i % len(ids)] for i in range(6)]]))
        torch.testing.assert_close(keys, real_k[:, 0])
        torch.testing.assert_close(values, real_v[:, 0])
    elif init == "random":  # no start: the MLP's own random output
        assert torch.equal(method.start, torch.zeros_like(method.start))
        assert keys.abs().sum() > 0


@pytest.mark.parametrize("which", ["masked_backend", "causal_backend"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_the_mlp_gives_identical_scores(request, which, dtype, tmp_path):
    backend = request.getfixturevalue(which)
    compiled, cands, batch = batch_for(backend, PrefixTuning.default_shapes[backend.kind])
    torch.manual_seed(2)
    method = PrefixTuning.create(backend, compiled, MANUAL, PrefixTuningConfig(reparam="mlp", init="random"))
    path = tmp_path / "prompt.safetensors"
    atomic_write_bytes(path, prompt_bytes(method))
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert sorted(saved) == ["prefix_keys", "prefix_values"]  # only the per-layer prefixes: no MLP
    reloaded = load_prompt(path)
    assert reloaded.n_virtual == compiled.n_virtual and reloaded.virtual_embeddings() is None
    with model_in_dtype(backend.model, dtype), torch.no_grad():
        before = candidate_scores(backend, method, batch, cands)
        after = candidate_scores(backend, reloaded, batch, cands)
    assert torch.equal(before, after)


@pytest.mark.parametrize("reparam", ["mlp", "none"])
@pytest.mark.parametrize("which", ["sharp_masked_backend", "causal_backend"])
def test_prefix_tuning_learns_a_learnable_relation(request, which, reparam):
    """Every object is one word the manual prompt ranks last; the prefix learns to put it first."""
    from test_train import MANUAL as TRAIN_MANUAL
    from test_train import learnable_problem

    from probe.trainer import TrainConfig, train_prompt

    backend = request.getfixturevalue(which)
    cands, train, dev, manual_p1 = learnable_problem(backend)
    compiled = compile_template(PrefixTuning.default_shapes[backend.kind], backend.tokenizer, backend.kind)
    torch.manual_seed(0)
    method = PrefixTuning.create(backend, compiled, TRAIN_MANUAL, PrefixTuningConfig(reparam=reparam, init="vocab"))
    config = TrainConfig(min_steps=0, lr=0.1, batch_size=5, epochs=10, eval_every=2, patience=100, seed=1)
    result = train_prompt(backend, method, FitTask(compiled, train, dev, cands, config))
    assert result.best_dev["p1"] >= manual_p1 + 30, (manual_p1, result)
    assert all(not p.requires_grad and p.grad is None for p in backend.model.parameters())


def test_a_virtual_target_is_refused(causal_backend):
    compiled = compile_template("(3, sub, 3, obj)", causal_backend.tokenizer, "causal")
    with pytest.raises(ProbeError, match=r"prefix-tuning needs a real token at the target position"):
        PrefixTuning.create(causal_backend, compiled, MANUAL)


def test_prefix_tuning_default_template_puts_the_prefix_first(causal_backend):
    from probe.options import load_template_spec

    assert load_template_spec(None, "prefix-tuning").template_for("P19", "causal").source == "(6, sub, obj)"
    assert load_template_spec(None, "ptuning").template_for("P19", "causal").source == "(3, sub, 3, obj)"
    assert load_template_spec(None, "prefix-tuning").template_for("P19", "masked").source == "(3, sub, 3, obj, 3)"


def test_method_config_options_and_errors():
    assert method_config("prefix-tuning", reparam="none", init=None) == PrefixTuningConfig(reparam="none")
    assert method_config("prompt-tuning", init="random", reparam=None).init == "random"
    with pytest.raises(ProbeError, match="--reparam does not apply to method 'prompt-tuning'"):
        method_config("prompt-tuning", init=None, reparam="mlp")
    with pytest.raises(ProbeError, match="unknown reparam 'lstm': expected one of mlp, none"):
        method_config("prefix-tuning", init=None, reparam="lstm")
    with pytest.raises(ProbeError, match="unknown init 'zeros'"):
        method_config("prefix-tuning", init="zeros", reparam=None)


def test_prefix_tuning_run_saves_only_prefixes_and_reproduces(causal_backend, tmp_path):
    from safetensors.torch import load_file
    from test_train import default_splits, make_lama, train_run

    from probe.commands.rerun import reevaluate_run

    lama = make_lama(tmp_path / "lama", default_splits())
    config = PrefixTuningConfig(reparam="mlp", init="template")
    _, run, data, cands = train_run(causal_backend, lama, tmp_path / "run", relation_ids=["P19"],
                                    method="prefix-tuning", method_config=config)
    tensors = load_file(str(run.root / "P19" / "prompt.safetensors"))
    assert sorted(tensors) == ["prefix_keys", "prefix_values"]
    assert tensors["prefix_keys"].shape == (2, 6, 32)
    cfg = (run.root / "P19" / "config.json").read_text()
    assert '"reparam": "mlp"' in cfg and '"layers": 2' in cfg
    (row,) = reevaluate_run(causal_backend, data, run.root, cands)
    assert all(row[k] == row[f"saved_{k}"] for k in ("p1", "p10", "mrr"))


def test_explain_reads_a_prefix_through_layer0_keys_and_values(causal_backend):
    """A virtual position whose layer-0 keys/values are those of ' Paris' has ' Paris' as nearest token."""
    from probe.explain import PREFIX_SPACE, explain_vectors, vocabulary_table

    table = vocabulary_table(causal_backend, PREFIX_SPACE, batch_size=8192)
    assert table.shape == (len(causal_backend.tokenizer), 64)
    paris = causal_backend.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    keys, values = causal_backend.token_kv(torch.tensor([[paris]]))
    vector = torch.cat([keys[0, 0], values[0, 0]], dim=-1)
    info = explain_vectors(causal_backend.tokenizer, table, vector, 3, {"Paris"}, set())
    assert info["slots"][0]["ids"][0] == paris
    assert info["gold_neighbours"] == ["ĠParis"]


@pytest.mark.parametrize("args,fragment", [
    (["--method", "ptuning", "--reparam", "mlp"], "--reparam does not apply to method 'ptuning'"),
    (["--method", "prefix-tuning", "--reparam", "lstm"], "unknown reparam 'lstm': expected one of mlp, none"),
    (["--method", "prefix-tuning", "--init", "zeros"], "unknown init 'zeros'"),
])
def test_cli_prefix_options_are_one_error_line(args, fragment, tmp_path):
    from conftest import assert_user_error

    assert_user_error(cli_in_process("train", "-r", "P19", "--out", tmp_path / "run", *args), fragment)
    assert not (tmp_path / "run").exists()


def test_a_virtual_target_is_refused_before_any_relation_trains(causal_backend, tmp_path):
    from test_train import default_splits, make_lama, train_run

    lama = make_lama(tmp_path / "lama", default_splits())
    with pytest.raises(ProbeError, match="prefix-tuning needs a real token at the target position"):
        train_run(causal_backend, lama, tmp_path / "run", method="prefix-tuning", template="(3, sub, 3, obj)")
    assert not (tmp_path / "run" / "P19").exists() and not (tmp_path / "run" / "P36").exists()
