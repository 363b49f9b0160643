"""Prompt methods: shapes and modules of P-tuning, prompt-tuning initialisations, the method registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from probe.backends import PromptInputs
from probe.errors import ProbeError
from probe.methods import METHODS, FixedPrompt, GradientPrompt, get_method
from probe.methods.autoprompt import AutoPrompt, TriggerSearchConfig
from probe.methods.manual import ManualPrompt
from probe.methods.prefix_tuning import PrefixTuning
from probe.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from probe.methods.ptuning import PTuningConfig, PTuningEncoder, PTuningMLP
from probe.templates import compile_template
from probe.trainer import TrainConfig

MANUAL = "[X] was born in [Y] ."
SHAPES = {"masked": "(3, sub, 3, obj, 3)", "causal": "(3, sub, 3, obj)"}


@pytest.fixture(params=["masked", "causal"])
def backend(request):
    return request.getfixturevalue(f"{request.param}_backend")


def rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each row, whether it equals some row of the table exactly."""
    return (rows[:, None, :] == table[None]).all(-1).any(-1)


def table_of(backend) -> torch.Tensor:
    return backend.model.get_input_embeddings().weight.detach().float().cpu()


# ---- registry -------------------------------------------------------------------------------


def test_registry_names_and_how_each_method_is_fit():
    assert set(METHODS) == {"manual", "ptuning", "ptuning-mlp", "prompt-tuning", "prefix-tuning", "autoprompt", "finetune"}
    assert METHODS["manual"] is ManualPrompt and not ManualPrompt.can_fit() and ManualPrompt.fit_config_class is None
    for name, cls in [("ptuning", PTuningEncoder), ("ptuning-mlp", PTuningMLP), ("prompt-tuning", PromptTuning),
                      ("prefix-tuning", PrefixTuning)]:
        assert get_method(name) is cls and cls.name == name
        assert cls.can_fit() and issubclass(cls, GradientPrompt) and cls.fit_config_class is TrainConfig
        assert cls.continuous
    assert get_method("autoprompt") is AutoPrompt and AutoPrompt.can_fit() and not AutoPrompt.continuous
    assert AutoPrompt.fit_config_class is TriggerSearchConfig and not issubclass(AutoPrompt, GradientPrompt)
    finetune = get_method("finetune")  # the one trainer, on the LM's own weights
    assert issubclass(finetune, GradientPrompt) and finetune.fit_config_class is TrainConfig
    assert finetune.trains_lm and not finetune.continuous
    assert [n for n, c in METHODS.items() if c.trains_lm] == ["finetune"]


def test_manual_method_has_nothing_to_fit():
    with pytest.raises(ProbeError, match="has nothing to train"):
        ManualPrompt(0, 16).fit(None, None)


def test_each_method_trains_at_the_lr_the_readme_gives_when_none_is_given():
    # the values chosen on dev (README, BENCHMARKS.md); finetune's 3e-5 once sat in a comment, leaving it at 1e-3
    lrs = {name: get_method(name).fit_config().lr for name in ("ptuning", "ptuning-mlp", "prompt-tuning",
                                                                 "prefix-tuning", "finetune")}
    assert lrs == {"ptuning": 1e-3, "ptuning-mlp": 1e-3, "prompt-tuning": 1e-2, "prefix-tuning": 1e-3,
                   "finetune": 3e-5}


def test_fit_config_takes_the_method_learning_rate_and_is_checked():
    assert PTuningEncoder.fit_config() == TrainConfig(lr=PTuningEncoder.default_lr)
    assert PrefixTuning.fit_config(epochs=3).lr == PrefixTuning.default_lr
    assert PromptTuning.fit_config(lr=0.5, seed=None).lr == 0.5  # None: the default
    assert AutoPrompt.fit_config(top_k=3) == TriggerSearchConfig(top_k=3)
    with pytest.raises(ProbeError, match="--epochs must be at least 1"):
        PTuningEncoder.fit_config(epochs=0)
    with pytest.raises(ProbeError, match="--iterations must be at least 1"):
        AutoPrompt.fit_config(iterations=0)


def test_prompt_inputs_carry_the_embeddings_or_the_prefix():
    torch.manual_seed(0)
    m = PTuningMLP(3, 8)
    inputs = m.prompt_inputs()
    assert isinstance(inputs, PromptInputs) and inputs.prefix is None
    assert torch.equal(inputs.embeddings, m.virtual_embeddings())
    keys, values = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    fixed = FixedPrompt(None, keys, values).prompt_inputs()
    assert fixed.embeddings is None and torch.equal(fixed.prefix[0], keys) and torch.equal(fixed.prefix[1], values)
    assert ManualPrompt(0, 8).prompt_inputs() == PromptInputs(None, None)


def test_get_method_unknown_name_lists_known_ones():
    with pytest.raises(ProbeError) as e:
        get_method("bogus")
    msg = str(e.value)
    assert "'bogus'" in msg
    for name in METHODS:
        assert name in msg


def test_manual_method_refuses_virtual_tokens():
    assert ManualPrompt(0, 16).virtual_embeddings() is None
    with pytest.raises(ProbeError, match="without virtual tokens"):
        ManualPrompt(3, 16)


def test_fixed_prompt_returns_its_float_copy():
    emb = torch.randn(4, 8, dtype=torch.float64)
    fixed = FixedPrompt(emb)
    out = fixed.virtual_embeddings()
    assert out.dtype == torch.float32 and out.shape == (4, 8) and fixed.n_virtual == 4 and fixed.hidden_size == 8
    assert torch.equal(out, emb.float())
    emb.zero_()  # a copy, not a view of the caller's tensor
    assert out.abs().sum() > 0
    assert not list(fixed.parameters())


# ---- P-tuning -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_virtual,hidden", [(9, 32), (6, 64), (1, 10)])
def test_ptuning_encoder_output_shape_and_modules(n_virtual, hidden):
    torch.manual_seed(0)
    m = PTuningEncoder(n_virtual, hidden)
    out = m.virtual_embeddings()
    assert out.shape == (n_virtual, hidden) and out.dtype == torch.float32
    assert out.requires_grad
    assert m.embedding.weight.shape == (n_virtual, hidden)
    lstm = m.lstm
    assert isinstance(lstm, nn.LSTM)
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers) == (hidden, hidden // 2, 2)
    assert lstm.bidirectional and lstm.batch_first
    lin = [x for x in m.mlp if isinstance(x, nn.Linear)]
    assert [type(x) for x in m.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [(x.in_features, x.out_features) for x in lin] == [(2 * (hidden // 2), hidden), (hidden, hidden)]
    assert m.config == PTuningConfig(lstm=True)


def test_ptuning_encoder_output_runs_through_lstm_then_mlp():
    torch.manual_seed(0)
    m = PTuningEncoder(5, 12)
    expected = m.mlp(m.lstm(m.embedding.weight[None])[0])[0]
    assert torch.allclose(m.virtual_embeddings(), expected)


def test_ptuning_mlp_has_no_lstm():
    torch.manual_seed(0)
    m = PTuningMLP(6, 32)
    assert m.lstm is None
    assert not any(isinstance(x, nn.LSTM) for x in m.modules())
    assert not any("lstm" in k for k in m.state_dict())
    lin = [x for x in m.mlp if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(32, 32), (32, 32)]
    out = m.virtual_embeddings()
    assert out.shape == (6, 32)
    assert torch.allclose(out, m.mlp(m.embedding.weight))
    assert m.config == PTuningConfig(lstm=False)
    assert PTuningMLP(2, 8, PTuningConfig(lstm=True)).lstm is None  # the name decides, not the config


def test_every_trainable_parameter_reaches_the_output():
    torch.manual_seed(0)
    for cls in (PTuningEncoder, PTuningMLP):
        m = cls(4, 16)
        m.virtual_embeddings().pow(2).sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (cls.name, name)


def test_ptuning_create_sizes_from_backend(backend):
    compiled = compile_template(SHAPES[backend.kind], backend.tokenizer, backend.kind)
    m = PTuningEncoder.create(backend, compiled, MANUAL)
    assert isinstance(m, PTuningEncoder)
    assert m.virtual_embeddings().shape == (compiled.n_virtual, backend.hidden_size)
    assert PTuningMLP.create(backend, compiled, MANUAL).lstm is None


# ---- prompt tuning --------------------------------------------------------------------------


def test_prompt_tuning_without_options_starts_from_vocabulary_rows(backend):
    """No options given: the prompt is the rows of the same seeded draw of frequent tokens as init=vocab."""
    compiled = compile_template(SHAPES[backend.kind], backend.tokenizer, backend.kind)
    torch.manual_seed(1)
    default = PromptTuning.create(backend, compiled, MANUAL).prompt.detach()
    torch.manual_seed(1)
    vocab = PromptTuning.create(backend, compiled, MANUAL, PromptTuningConfig(init="vocab")).prompt.detach()
    assert torch.equal(default, vocab)
    assert rows_in(default, table_of(backend)[:5000]).all()


def test_prompt_tuning_random_init(backend):
    compiled = compile_template(SHAPES[backend.kind], backend.tokenizer, backend.kind)
    torch.manual_seed(0)
    m = PromptTuning.create(backend, compiled, MANUAL, PromptTuningConfig(init="random"))
    table = table_of(backend)
    emb = m.virtual_embeddings().detach()
    assert isinstance(m.prompt, nn.Parameter) and m.prompt.requires_grad
    assert emb.shape == (compiled.n_virtual, backend.hidden_size) and emb.dtype == torch.float32
    assert m.config.init == "random"
    # scaled like the embedding table, and not copies of its rows
    assert 0.3 < float(emb.std() / table.std()) < 3
    assert not rows_in(emb, table).any()
    torch.manual_seed(0)
    again = PromptTuning.create(backend, compiled, MANUAL, PromptTuningConfig(init="random"))
    assert torch.equal(again.prompt, m.prompt)


def test_prompt_tuning_vocab_init_copies_low_id_rows(backend):
    compiled = compile_template(SHAPES[backend.kind], backend.tokenizer, backend.kind)
    torch.manual_seed(1)
    m = PromptTuning.create(backend, compiled, MANUAL, PromptTuningConfig(init="vocab"))
    table = table_of(backend)
    low = table[: min(5000, table.shape[0])]
    emb = m.prompt.detach()
    assert emb.shape == (compiled.n_virtual, backend.hidden_size)
    assert rows_in(emb, low).all()
    # a copy: training the prompt leaves the LM's table alone
    with torch.no_grad():
        m.prompt.add_(1.0)
    assert torch.equal(table_of(backend), table)


@pytest.mark.parametrize("shape,n", [("(3, sub, 3, obj)", 6), ("(1, sub, 1, obj)", 2), ("(sub, 3, obj)", 3),
                                     ("(sub, 1, obj)", 1)])
def test_prompt_tuning_template_init_rows_are_manual_words(backend, shape, n):
    compiled = compile_template(shape, backend.tokenizer, backend.kind)
    assert compiled.n_virtual == n
    m = PromptTuning.create(backend, compiled, MANUAL, PromptTuningConfig(init="template"))
    ids = backend.tokenizer.encode(" was born in", add_special_tokens=False)
    assert len(ids) == 3
    assert backend.tokenizer.decode(ids).strip() == "was born in"
    table = table_of(backend)
    expected = table[torch.tensor([ids[i % 3] for i in range(n)])]  # cycled when more slots than words
    assert torch.equal(m.prompt.detach(), expected)


def test_prompt_tuning_template_init_uses_leading_space_tokens(causal_backend):
    """For a BPE vocabulary, the manual words are the word-start tokens (' was'), not the bare ones ('was')."""
    tok = causal_backend.tokenizer
    compiled = compile_template("(2, sub, obj)", tok, "causal")
    m = PromptTuning.create(causal_backend, compiled, "The capital of [X] is [Y] .", PromptTuningConfig(init="template"))
    spaced = tok.encode(" is", add_special_tokens=False)
    bare = tok.encode("is", add_special_tokens=False)
    assert len(spaced) == 1 and spaced != bare
    table = table_of(causal_backend)
    assert torch.equal(m.prompt.detach(), table[spaced * 2])


def test_prompt_tuning_template_init_only_between_x_and_y(masked_backend):
    tok = masked_backend.tokenizer
    compiled = compile_template("(3, sub, 3, obj, 3)", tok, "masked")
    m = PromptTuning.create(masked_backend, compiled, "The official language of [X] is [Y] .",
                            PromptTuningConfig(init="template"))
    (is_id,) = tok.encode("is", add_special_tokens=False)
    table = table_of(masked_backend)
    assert torch.equal(m.prompt.detach(), table[[is_id] * 9])


@pytest.mark.parametrize("init", ["vocab", "template"])
def test_prompt_tuning_word_slots_start_as_their_words(backend, init):
    compiled = compile_template('(2, sub, ["is a"], obj)', backend.tokenizer, backend.kind)
    words = compiled.start_ids[2:]
    assert len(words) == 2 and compiled.n_virtual == 4
    m = PromptTuning.create(backend, compiled, MANUAL, PromptTuningConfig(init=init))
    table = table_of(backend)
    assert torch.equal(m.prompt.detach()[2:], table[words])
    assert not torch.equal(m.prompt.detach()[:2], table[words])  # the plain virtual slots follow the init


def test_prompt_tuning_unknown_init_is_a_probe_error(backend):
    compiled = compile_template(SHAPES[backend.kind], backend.tokenizer, backend.kind)
    with pytest.raises(ProbeError, match="unknown init 'bogus'") as e:
        PromptTuning.create(backend, compiled, MANUAL, PromptTuningConfig(init="bogus"))
    for init in ("random", "vocab", "template"):
        assert init in str(e.value)
    with pytest.raises(ProbeError, match="unknown init"):
        PromptTuning(3, 8, PromptTuningConfig(init="bogus"))


def test_prompt_tuning_owns_its_init_tensor():
    init = torch.randn(3, 8)
    m = PromptTuning(3, 8, PromptTuningConfig(init="random"), init=init)
    assert torch.equal(m.virtual_embeddings(), init)
    init.zero_()
    assert m.prompt.abs().sum() > 0
    assert m.virtual_embeddings() is m.prompt
