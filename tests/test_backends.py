"""probe.backends: scores at the target equal the full HF forward, causal reading position, loading and errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import cli_in_process, model_in_dtype, save_tiny_llama
from transformers import BertConfig, GPT2Config, LlamaConfig, ViTConfig

from probe.backends import BACKENDS, backend_class, cache_dir, load_backend, model_kind, resolve_model
from probe.backends.causal import CausalLM
from probe.backends.llama import LlamaCausalLM
from probe.backends.masked import MaskedLM, _head_transform
from probe.batching import collate
from probe.data import Fact
from probe.errors import ProbeError
from probe.evaluator import evaluate_facts
from probe.methods.manual import ManualPrompt
from probe.templates import Encoded, compile_template
from probe.vocab import build_candidates

P19 = "[X] was born in [Y] ."
FACTS = [
    Fact("Dante", "Florence"),
    Fact("Victor Hugo", "Paris"),
    Fact("Dante Alighieri Parisville", "Florence"),
    Fact("Rome", "Italy"),
]
WORDS = ["Paris", "France", "Rome", "Italy", "Berlin", "Germany", "Florence", "London", "the", "city"]


def full_forward_scores(backend, batch, candidates):
    logits = backend.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = torch.arange(len(batch.facts))
    return logits[rows, batch.target][:, candidates.token_ids].float()


def probe_scores(backend, batch, candidates):
    hidden = backend.target_hidden(backend.embed(batch.input_ids), batch.attention_mask, batch.target)
    return backend.candidate_logits(hidden, candidates.token_ids)


# ---- loading --------------------------------------------------------------------------------


def test_masked_backend_loads_from_folder(masked_backend, wordpiece_tokenizer):
    b = masked_backend
    assert b.kind == "masked"
    assert type(b.model).__name__ == "BertForMaskedLM"
    assert b.hidden_size == 32
    assert b.dtype == torch.float32
    assert b.device == torch.device("cpu")
    assert type(b) is MaskedLM and b.transform is b.model.cls.predictions.transform
    assert b.output_layer() is b.model.get_output_embeddings()
    assert b.tokenizer.mask_token_id == wordpiece_tokenizer.mask_token_id
    assert b.tokenizer.tokenize("Paris") == ["Paris"]  # saved cased, reloaded cased
    assert not b.model.training
    assert not any(p.requires_grad for p in b.model.parameters())


def test_causal_backend_loads_from_folder(causal_backend, bpe_tokenizer):
    b = causal_backend
    assert b.kind == "causal"
    assert type(b.model).__name__ == "LlamaForCausalLM"
    assert b.hidden_size == 64
    assert type(b) is LlamaCausalLM
    assert len(b.tokenizer) == len(bpe_tokenizer)
    # the padding token: the tokenizer's (transformers 5.2x reads one from SmolLM2's GGUF; older ones none), else EOS
    assert b.pad_id == next(t for t in (bpe_tokenizer.pad_token_id, bpe_tokenizer.eos_token_id) if t is not None)


def test_load_bfloat16_scores_in_float32(tiny_causal_dir):
    b = load_backend(str(tiny_causal_dir), dtype="bfloat16")
    assert b.dtype == torch.bfloat16
    cands = build_candidates(b.tokenizer, WORDS)
    compiled = compile_template(P19, b.tokenizer, "causal")
    batch = collate(compiled, [Fact("Rome", "Italy")], cands, b.pad_id)
    scores = probe_scores(b, batch, cands)
    assert scores.dtype == torch.float32
    assert scores.shape == (1, len(cands))


@pytest.mark.parametrize("name", ["/nonexistent", "/nonexistent/model-folder"])
def test_nonexistent_model(name):
    with pytest.raises(ProbeError) as e:
        load_backend(name)
    msg = str(e.value)
    assert msg == (f"model folder {name} not found: expected a local model folder, a hub id, a .gguf file or 'smollm2'")
    assert "\n" not in msg


def test_empty_folder_is_not_a_model(tmp_path):
    with pytest.raises(ProbeError, match="cannot load model") as e:
        load_backend(str(tmp_path))
    assert "\n" not in str(e.value)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ProbeError, match=r"model file .*missing.gguf not found: expected a .gguf file"):
        load_backend(str(tmp_path / "missing.gguf"))


def test_bad_dtype_and_device(tiny_causal_dir):
    with pytest.raises(ProbeError, match="unknown dtype 'float8': expected one of float32, bfloat16, float16"):
        load_backend(str(tiny_causal_dir), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ProbeError, match="CUDA is not available"):
            load_backend(str(tiny_causal_dir), device="cuda")


def test_model_kind_from_config():
    assert model_kind(BertConfig(architectures=["BertForMaskedLM"])) == "masked"
    assert model_kind(BertConfig()) == "masked"  # no architectures: from the model type
    assert model_kind(LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal"
    assert model_kind(GPT2Config(architectures=["GPT2LMHeadModel"])) == "causal"
    assert model_kind(LlamaConfig()) == "causal"
    with pytest.raises(ProbeError, match="model type 'vit' is neither a masked nor a causal LM"):
        model_kind(ViTConfig())


def test_masked_head_of_bert(masked_backend):
    assert _head_transform(masked_backend.model) is masked_backend.model.cls.predictions.transform


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBE_CACHE", str(tmp_path / "pc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "pc"
    monkeypatch.delenv("PROBE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "probe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "probe"


def test_smollm2_converts_into_the_test_cache(smollm2_dir):
    import os

    assert Path(smollm2_dir).is_relative_to(Path(os.environ["PROBE_CACHE"]) / "models")
    assert (smollm2_dir / "config.json").exists() and (smollm2_dir / "model.safetensors").exists()
    assert resolve_model("smollm2") == str(smollm2_dir)
    assert resolve_model("SmolLM2") == str(smollm2_dir)  # second call: from the cache, same folder
    assert resolve_model("some/hub-id") == "some/hub-id"
    assert not list(smollm2_dir.parent.glob(".tmp-*"))


# ---- scores at the target == the full forward -----------------------------------------------


def test_masked_scores_equal_full_forward(masked_backend):
    b = masked_backend
    cands = build_candidates(b.tokenizer, WORDS)
    assert len(cands) == len(WORDS)
    compiled = compile_template(P19, b.tokenizer, "masked")
    batch = collate(compiled, FACTS, cands, b.pad_id)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # varying lengths, right padding
    rows = torch.arange(len(FACTS))
    assert (batch.input_ids[rows, batch.target] == b.tokenizer.mask_token_id).all()
    with torch.no_grad():
        ours = probe_scores(b, batch, cands)
        ref = full_forward_scores(b, batch, cands)
    assert ours.shape == (4, len(cands))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1  # not a degenerate model


def test_causal_scores_equal_full_forward_at_last_real_token(causal_backend):
    b = causal_backend
    cands = build_candidates(b.tokenizer, WORDS)
    compiled = compile_template(P19, b.tokenizer, "causal")
    batch = collate(compiled, FACTS, cands, b.pad_id)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # 5, 5, 10 and 4 tokens: right padding in one batch
    assert batch.target.tolist() == (lengths - 1).tolist()
    assert (batch.input_ids[batch.attention_mask == 0] == b.pad_id).all()
    with torch.no_grad():
        ours = probe_scores(b, batch, cands)
        ref = full_forward_scores(b, batch, cands)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        # and each row equals the same fact run alone, without padding
        for i, n in enumerate(lengths.tolist()):
            alone = b.model(input_ids=batch.input_ids[i:i + 1, :n]).logits[0, -1, cands.token_ids]
            torch.testing.assert_close(ours[i], alone, rtol=1e-4, atol=1e-5)


def test_llama_fast_path_equals_transformers_at_any_target(causal_backend):
    """The fast Llama forward gives transformers' hidden state and gradient at targets anywhere in the row."""
    b = causal_backend
    assert isinstance(b, LlamaCausalLM)
    cands = build_candidates(b.tokenizer, WORDS)
    batch = collate(compile_template(P19, b.tokenizer, "causal"), FACTS, cands, b.pad_id)
    target = torch.tensor([0, 2, 9, 1])  # the first token, mid-row, the last of the longest row, a padded row
    embeds = b.embed(batch.input_ids).detach().requires_grad_(True)
    weights = torch.randn(4, b.hidden_size, generator=torch.Generator().manual_seed(0))  # a loss that reads every unit
    fast = b.forward(embeds, target)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), embeds)
    out = b.body(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    ref = out[torch.arange(4), target]
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), embeds)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-4, atol=1e-5)
    assert grad_fast[1, 3:].abs().sum() == 0  # nothing right of the target reaches it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_out_layer_backward_equals_autograds(causal_backend, dtype):
    """In training, layers before the last run as `_FrozenLayer`: the loss and the prompt's gradient on a batch run
    as one sequence are autograd's through the same layers (a hook on each layer turns the Function off)."""
    from probe.backends import llama_forward
    from probe.batching import make_batches
    from probe.methods import get_method

    b = causal_backend
    cands = build_candidates(b.tokenizer, WORDS)
    compiled = compile_template("(3, sub, 3, obj)", b.tokenizer, "causal")
    torch.manual_seed(0)
    method = get_method("ptuning").create(b, compiled, P19)
    (batch,) = make_batches(compiled, [f for f in FACTS if f.obj in cands.index], cands, 8, b.pad_id, max_padding=10.0)
    ran = []
    apply = llama_forward._FrozenLayer.apply

    def loss_and_grad():
        loss = b.gold_loss(batch, method.prompt_inputs(), cands).sum()
        return loss.detach(), torch.autograd.grad(loss, [p for p in method.parameters() if p.requires_grad])

    with model_in_dtype(b.model, dtype), pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_forward._FrozenLayer, "apply", lambda *a: ran.append(1) or apply(*a))
        loss, grads = loss_and_grad()
        assert len(ran) == b.model.config.num_hidden_layers - 1
        hooks = [layer.register_forward_hook(lambda *a: None) for layer in b.model.model.layers]
        try:
            ref_loss, ref_grads = loss_and_grad()
        finally:
            for hook in hooks:
                hook.remove()
        assert len(ran) == b.model.config.num_hidden_layers - 1  # the autograd path
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    else:  # bfloat16 rounds elsewhere along the way: close, not equal
        torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=0)
        for g, r in zip(grads, ref_grads, strict=True):
            assert (g - r).norm() < 1e-2 * r.norm()
    assert max(g.abs().max() for g in grads) > 0


def test_rms_norm_and_rotary_gradients_written_out():
    """`_rms_norm_input_grad` and `_unrotate` are autograd's gradients of `_rms_norm` and `_rotate`."""
    from probe.backends.llama_forward import _rms_norm, _rms_norm_input_grad, _rotate, _unrotate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight, grad = torch.randn(8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    (ref,) = torch.autograd.grad(_rms_norm(x, weight, 1e-5), x, grad)
    torch.testing.assert_close(_rms_norm_input_grad(x.detach(), weight, 1e-5, grad), ref, rtol=1e-5, atol=1e-6)
    q = torch.randn(2, 3, 5, 8, generator=gen, requires_grad=True)
    cos, sin = torch.randn(2, 1, 5, 8, generator=gen), torch.randn(2, 1, 5, 8, generator=gen)
    grad = torch.randn(2, 3, 5, 8, generator=gen)
    (ref,) = torch.autograd.grad(_rotate(q, cos, sin), q, grad)
    torch.testing.assert_close(_unrotate(grad, cos, sin), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_fast_path_with_packed_weights(causal_backend, dtype, monkeypatch):
    """Without autograd the fast forward packs its weights: transformers' hidden states in float32, and in
    bfloat16 the very same bits as the forward through F.linear."""
    from probe.backends import packed

    b = causal_backend
    batch = collate(compile_template(P19, b.tokenizer, "causal"), FACTS, build_candidates(b.tokenizer, WORDS), b.pad_id)
    with model_in_dtype(b.model, dtype), torch.no_grad():
        b.forward.linear.clear()
        embeds = b.embed(batch.input_ids)
        fast = b.forward(embeds, batch.target)
        assert bool(b.forward.linear._packed) == (packed._enabled and dtype in packed._DTYPES)
        out = b.body(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
        monkeypatch.setattr(packed, "_enabled", False)
        unpacked = b.forward(embeds, batch.target)
    if dtype == torch.float32:
        torch.testing.assert_close(fast, out[torch.arange(4), batch.target], rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, unpacked) if dtype == torch.bfloat16 else torch.allclose(fast, unpacked, atol=1e-5)


def test_llama_shared_start_run_once_equals_the_whole_input(causal_backend):
    """Keys and values of a start shared by every row, run once, then the rows' rest: the same hidden states."""
    b = causal_backend
    batch = collate(compile_template("The capital of [X] is [Y] .", b.tokenizer, "causal"), FACTS, build_candidates(
        b.tokenizer, WORDS), b.pad_id)
    start = len(b.tokenizer.encode("The capital of", add_special_tokens=False))
    assert start == 3 and (batch.input_ids[:, :start] == batch.input_ids[0, :start]).all()
    embeds = b.embed(batch.input_ids)
    with torch.no_grad():
        whole = b.target_hidden(embeds, batch.attention_mask, batch.target)
        past = b.forward.start_kv(embeds[:1, :start])
        rest = b.forward(embeds[:, start:], batch.target - start, past)
    assert len(past.keys) == b.model.config.num_hidden_layers and past.keys[0].shape[2] == start
    torch.testing.assert_close(rest, whole, rtol=1e-5, atol=1e-5)
    # a wrong start position shows: the rest run as if it came first is not the same
    with torch.no_grad():
        alone = b.target_hidden(embeds[:, start:], batch.attention_mask[:, start:], batch.target - start)
    assert (alone - whole).abs().max() > 1e-2


def test_registry_picks_the_most_specific_backend_of_the_kind():
    """Plain Llama configs get the Llama family's backend; other causal configs the generic one; BERT the masked one."""
    assert {MaskedLM, CausalLM, LlamaCausalLM} <= set(BACKENDS)
    assert backend_class(LlamaConfig(), "causal") is LlamaCausalLM
    assert backend_class(LlamaConfig(attention_bias=True), "causal") is CausalLM  # not what the fast forward computes
    assert backend_class(GPT2Config(), "causal") is CausalLM
    assert backend_class(BertConfig(), "masked") is MaskedLM
    with pytest.raises(ProbeError, match="no backend for a seq2seq LM of model type 'gpt2'"):
        backend_class(GPT2Config(), "seq2seq")


def test_generic_causal_backend_scores_through_the_same_call(tmp_path, tiny_causal_dir, bpe_tokenizer):
    """A GPT-2 gets the generic causal backend; its `score` equals the full forward. The same tiny Llama behind the
    generic backend and behind the Llama one gives the same scores, with and without shared starts."""
    from transformers import GPT2LMHeadModel

    from probe.backends import PromptInputs

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    bpe_tokenizer.save_pretrained(tmp_path / "gpt2")
    b = load_backend(str(tmp_path / "gpt2"))
    assert type(b) is CausalLM and b.kind == "causal"
    cands = build_candidates(b.tokenizer, WORDS)
    batch = collate(compile_template(P19, b.tokenizer, "causal"), FACTS, cands, b.pad_id)
    with torch.no_grad():
        (ours,) = b.score([batch], PromptInputs(), cands)
        torch.testing.assert_close(ours, full_forward_scores(b, batch, cands), rtol=1e-5, atol=1e-5)
    causal_backend = load_backend(str(tiny_causal_dir))  # its own copy: other tests change the shared one in place
    generic = CausalLM(causal_backend.model, causal_backend.tokenizer, "generic")
    batches = [collate(compile_template("The capital of [X] is [Y] .", b.tokenizer, "causal"), FACTS, cands, b.pad_id)]
    with torch.no_grad():
        for prompt_batches in (batches, [batch]):
            (fast,) = causal_backend.score(prompt_batches, PromptInputs(), cands)
            (plain,) = generic.score(prompt_batches, PromptInputs(), cands)
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
            assert fast.std() > 0  # real scores, not a constant


def test_llama_fast_path_only_for_plain_llama():
    assert LlamaCausalLM.supports(LlamaConfig())
    assert not LlamaCausalLM.supports(LlamaConfig(attention_bias=True))
    assert not LlamaCausalLM.supports(GPT2Config())


def test_candidate_rows_cache_follows_the_candidates(masked_backend):
    b = masked_backend
    small = build_candidates(b.tokenizer, ["Paris", "Rome"])
    big = build_candidates(b.tokenizer, WORDS)
    compiled = compile_template(P19, b.tokenizer, "masked")
    batch = collate(compiled, [Fact("Dante", "Paris")], small, b.pad_id)
    with torch.no_grad():
        a = probe_scores(b, batch, small)
        c = probe_scores(b, batch, big)
    assert a.shape == (1, 2) and c.shape == (1, len(WORDS))
    torch.testing.assert_close(a[0], c[0, [WORDS.index("Paris"), WORDS.index("Rome")]])


# ---- causal off-by-one: a toy model whose next token is known -------------------------------

OFF_BY_ONE_FACTS = [Fact("Paris", "France"), Fact("Rome", "Italy"), Fact("Berlin", "Germany"),
                    Fact("Madrid", "Spain"), Fact("Besancon", "France")]
COUNTRIES = ["France", "Italy", "Germany", "Spain"]
TEMPLATE = "Where is [X] [Y] ."  # the input ends at the subject's last token


def _one_token(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.fixture(scope="module")
def next_token_backend(tmp_path_factory, bpe_tokenizer):
    """1-layer Llama whose blocks add nothing, so the hidden state at a position is its token's embedding.

    Every token embedding holds a shared "junk" direction (dim 0) that scores " Japan". The subject's
    last token has its own direction, scored by its object's row; each country's own direction is scored
    by the next country's row. So reading the subject's last token predicts the object, reading the token
    before it (" is", or a subject piece) predicts Japan, and reading an appended object predicts another
    country.
    """
    tok = bpe_tokenizer
    sub_last = {f.sub: tok.encode(" " + f.sub, add_special_tokens=False)[-1] for f in OFF_BY_ONE_FACTS}
    assert len(tok.encode(" Besancon", add_special_tokens=False)) == 3  # a multi-token subject too
    country = {c: _one_token(tok, " " + c) for c in [*COUNTRIES, "Japan"]}

    def edit(model):
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb.zero_()
        emb[:, 0] = 0.5
        head.zero_()
        head[country["Japan"], 0] = 1.0
        dims = iter(range(1, 64))
        for f in OFF_BY_ONE_FACTS:
            d = next(dims)
            emb[sub_last[f.sub], d] = 1.0
            head[country[f.obj], d] = 1.0
        for i, c in enumerate(COUNTRIES):
            d = next(dims)
            emb[country[c], d] = 1.0
            head[country[COUNTRIES[(i + 1) % len(COUNTRIES)]], d] = 1.0

    folder = save_tiny_llama(tmp_path_factory.mktemp("next-token"), tok, edit=edit, num_hidden_layers=1)
    backend = load_backend(str(folder))
    assert backend.kind == "causal"
    return backend


def _evaluate(backend, compiled):
    cands = build_candidates(backend.tokenizer, [*COUNTRIES, "Japan"])
    assert len(cands) == 5
    return evaluate_facts(backend, ManualPrompt(0, backend.hidden_size), compiled, OFF_BY_ONE_FACTS, cands,
                          batch_size=8)


def test_causal_reads_the_last_input_token(next_token_backend):
    compiled = compile_template(TEMPLATE, next_token_backend.tokenizer, "causal")
    result = _evaluate(next_token_backend, compiled)
    assert result.metrics["p1"] == 100.0
    assert result.metrics["mrr"] == 1.0
    assert result.ranks == [1] * 5
    predicted = {(f.sub, top[0]) for f, top in zip(result.facts, result.top10, strict=True)}
    assert predicted == {(f.sub, f.obj) for f in OFF_BY_ONE_FACTS}


@dataclasses.dataclass
class _Shifted:
    """A compiled template whose encoding is changed the way an off-by-one bug would change it."""

    inner: object
    change: object

    def encode_fact(self, fact):
        return self.change(self.inner.encode(fact.sub), fact.sub)

    def input_key(self, fact):
        return fact.sub


def test_the_toy_model_catches_off_by_one(next_token_backend):
    """The same evaluation with the target one too early, or with the object appended and read, gives P@1 0."""
    tok = next_token_backend.tokenizer
    compiled = compile_template(TEMPLATE, tok, "causal")
    obj_of = {f.sub: f.obj for f in OFF_BY_ONE_FACTS}

    def one_earlier(enc, sub):
        return Encoded(enc.input_ids, enc.virtual_positions, len(enc.input_ids) - 2)

    def object_appended(enc, sub):
        ids = [*enc.input_ids, _one_token(tok, " " + obj_of[sub])]
        return Encoded(ids, enc.virtual_positions, len(ids) - 1)

    early = _evaluate(next_token_backend, _Shifted(compiled, one_earlier))
    assert early.metrics["p1"] == 0.0
    assert all(top[0] == "Japan" for top in early.top10)
    appended = _evaluate(next_token_backend, _Shifted(compiled, object_appended))
    assert appended.metrics["p1"] == 0.0
    nxt = {c: COUNTRIES[(i + 1) % 4] for i, c in enumerate(COUNTRIES)}
    assert [top[0] for top in appended.top10] == [nxt[f.obj] for f in appended.facts]


# ---- the random-model control ---------------------------------------------------------------


def test_random_model_control_redraws_every_weight_seeded(tiny_causal_dir):
    real = load_backend(str(tiny_causal_dir))
    a = load_backend(str(tiny_causal_dir), control="random-model", seed=1)
    b = load_backend(str(tiny_causal_dir), control="random-model", seed=1)
    c = load_backend(str(tiny_causal_dir), control="random-model", seed=2)
    assert a.control == "random-model" and real.control == "none"
    ra, rb, rc = (dict(x.model.named_parameters()) for x in (a, b, c))
    for name, p in real.model.named_parameters():
        assert torch.equal(ra[name], rb[name]), name  # same seed, same weights
        if name.endswith("norm.weight"):
            assert (ra[name] == 1).all(), name
        else:
            assert not torch.equal(ra[name], p), name  # every weight re-drawn
            assert not torch.equal(ra[name], rc[name]), name
            assert abs(ra[name].std().item() - a.model.config.initializer_range) < 0.01, name
    assert not any(p.requires_grad for p in a.model.parameters())  # still frozen


def test_unknown_control_is_a_probe_error(tiny_causal_dir):
    with pytest.raises(ProbeError, match="unknown model control 'shuffled': expected one of none, random-model"):
        load_backend(str(tiny_causal_dir), control="shuffled")


def test_random_model_runs_are_labelled_and_recorded(tmp_path, tiny_causal_dir):
    from conftest import make_fake_lama

    from probe.comparison import run_label

    lama = make_fake_lama(tmp_path / "lama")
    out = tmp_path / "run"
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "--relation", "P36", "--control", "random-model", "--seed", "5",
                   "--data", lama, "--out", out)
    assert proc.returncode == 0, proc.stderr
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["control"] == "random-model" and cfg["seed"] == 5
    assert run_label(cfg) == "manual+random-model"
    assert run_label({"method": "manual"}) == "manual"


def test_first_token_keys_and_values_run_once_per_token_and_kept(causal_backend, monkeypatch):
    """Inputs' first tokens see nothing else: their keys and values are kept across calls, and re-run when
    the weights change. New tokens run in passes of FIRST_TOKENS_CHUNK rows, so a token's keys and values do not
    depend on the tokens run with it."""
    import probe.backends.llama as llama

    b = causal_backend
    ids = torch.tensor(b.tokenizer.encode("Rome Paris Dante", add_special_tokens=False))
    assert len(ids) == 3
    with torch.no_grad():
        expected = b.forward.start_kv(b.embed(ids[:, None]))
    runs = []
    real = b.forward.start_kv
    monkeypatch.setattr(b.forward, "start_kv", lambda embeds, start=None: runs.append(len(embeds)) or real(embeds, start))
    with torch.no_grad():
        first = b.first_token_starts(ids[:2])
        again = b.first_token_starts(ids.flip(0))  # one new token, rows in the order asked for
    assert runs == [llama.FIRST_TOKENS_CHUNK] * 2
    for got, want in ((first, expected.select(torch.tensor([0, 1]))), (again, expected.select(torch.tensor([2, 1, 0])))):
        assert got.length == 1
        for a, e in zip(got.keys + got.values, want.keys + want.values, strict=True):
            torch.testing.assert_close(a, e)
    weight = b.model.get_input_embeddings().weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(2.0)
        changed = b.first_token_starts(ids)
        weight.copy_(saved)
    assert runs[-1] == llama.FIRST_TOKENS_CHUNK and not torch.allclose(changed.keys[0], expected.keys[0])
    # more new tokens than a pass holds: several passes, the rows still in the order asked for
    monkeypatch.setattr(llama, "FIRST_TOKENS_CHUNK", 2)
    b._first_tokens = None
    runs.clear()
    with torch.no_grad():
        three = b.first_token_starts(ids)
    assert runs == [2, 2]
    for a, e in zip(three.keys + three.values, expected.keys + expected.values, strict=True):
        torch.testing.assert_close(a, e)
    # past the cap the kept tokens are dropped: a new token starts over
    monkeypatch.setattr(llama, "FIRST_TOKENS_MAX", 3)
    other = torch.tensor(b.tokenizer.encode("Berlin", add_special_tokens=False)[:1])
    assert other[0] not in ids
    with torch.no_grad():
        b.first_token_starts(ids)
        runs.clear()
        b.first_token_starts(ids[:1])  # kept: nothing runs
        b.first_token_starts(other)
    assert runs == [2] and len(b._first_tokens.row) == 1


def test_a_gguf_conversion_is_kept_per_transformers_version(tmp_path, monkeypatch):
    """Versions of transformers convert a GGUF tokenizer differently (5.5 splits " the" in two, 5.0 and 5.10 do not),
    so a conversion made under one version is never reused under another."""
    import importlib.metadata

    from probe.backends.loading import gguf_cache_key

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.metadata.version
    first = gguf_cache_key(gguf)
    assert gguf_cache_key(gguf) == first
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "transformers" else real(name))
    assert gguf_cache_key(gguf) != first
