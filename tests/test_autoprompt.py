"""AutoPrompt: trigger search on tiny masked and causal LMs, candidate filters, determinism, saved triggers.

Tiny models only (conftest's tiny Llama on the SmolLM2 tokenizer, and a "sharp" tiny BERT built here
whose [MASK] scores move with its input); each test takes a few seconds on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, cli_in_process, train_here, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

import cli
from probe.backends import PromptInputs
from probe.batching import collate
from probe.commands.rerun import reevaluate_run
from probe.data import Fact, LamaData
from probe.evaluator import evaluate_facts
from probe.fit import FitTask, fit
from probe.methods import autoprompt, get_method
from probe.methods.autoprompt import (
    AutoPrompt,
    AutoPromptConfig,
    TriggerSearchConfig,
    allowed_tokens,
    batch_loss,
    flip_candidates,
    flip_losses,
    search_triggers,
)
from probe.options import load_template_spec
from probe.pack import fit_pack
from probe.runs import RunConfig, RunFolder
from probe.templates import DEFAULT_SHAPES, compile_template, encode_words
from probe.vocab import build_candidates

CANDIDATES = ["Paris", "France", "Rome", "Italy", "Berlin", "Germany", "Madrid", "Spain", "London", "England",
              "Tokyo", "Japan", "Lyon", "Milan", "Florence", "French", "Italian", "German", "English"]
SUBJECTS = ["Dante", "Victor", "Hugo", "Alighieri", "Besancon", "Aaron", "Abbey", "Abraham", "Abel", "Abigail",
            "city", "capital", "language", "official", "died", "Victor Hugo"]
MANUAL = "[X] was born in [Y] ."


@pytest.fixture(params=["sharp_masked_backend", "causal_backend"])
def backend(request):
    return request.getfixturevalue(request.param)


def setup(backend):
    """Candidates, the default P-tuning shape compiled, and a fresh AutoPrompt on it."""
    cands = build_candidates(backend.tokenizer, CANDIDATES)
    compiled = compile_template(DEFAULT_SHAPES[backend.kind], backend.tokenizer, backend.kind)
    return cands, compiled, AutoPrompt.create(backend, compiled, MANUAL)


def constant_object_problem(backend, cands, config: AutoPromptConfig | None = None, manual: str = MANUAL):
    """Every fact's object is the candidate of median rank under the starting triggers: learnable, P@1 ~ 0 at start."""
    default = compile_template(DEFAULT_SHAPES[backend.kind], backend.tokenizer, backend.kind).template
    template = AutoPrompt.relation_template(default, manual, backend.kind, config or AutoPromptConfig())
    compiled = compile_template(template, backend.tokenizer, backend.kind)
    ev = evaluate_facts(backend, AutoPrompt.create(backend, compiled, manual, config), compiled,
                        [Fact(s, w) for s in SUBJECTS for w in CANDIDATES], cands)
    mean_rank = {w: 0 for w in CANDIDATES}
    for f, r in zip(ev.facts, ev.ranks, strict=True):
        mean_rank[f.obj] += r
    x = sorted(CANDIDATES, key=lambda w: (mean_rank[w], w))[len(CANDIDATES) // 2]
    return [Fact(s, x) for s in SUBJECTS[:10]], [Fact(s, x) for s in SUBJECTS[10:]]


def full_loss(backend, method, compiled, facts, cands) -> float:
    with torch.no_grad():
        return batch_loss(backend, method.prompt_inputs(), collate(compiled, facts, cands, backend.pad_id), cands).item()


def token_id(backend, word: str) -> int:
    ids = encode_words(backend.tokenizer, word, True, True)
    assert len(ids) == 1, word
    return ids[0]


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def test_triggers_start_as_the_and_embed_as_lm_rows(backend):
    _, compiled, method = setup(backend)
    the = token_id(backend, "the")
    assert method.trigger_ids.tolist() == [the] * compiled.n_virtual
    table = backend.model.get_input_embeddings().weight
    assert torch.equal(method.virtual_embeddings(), table[method.trigger_ids])
    assert list(method.state_dict()) == ["trigger_ids"]  # the LM is used, not owned
    assert not list(method.parameters())
    assert get_method("autoprompt") is AutoPrompt and AutoPrompt.can_fit()
    assert AutoPrompt.fit_config_class is TriggerSearchConfig and not AutoPrompt.continuous
    inputs = method.prompt_inputs()
    assert isinstance(inputs, PromptInputs) and inputs.prefix is None
    assert torch.equal(inputs.embeddings, table[method.trigger_ids])


def test_saved_info_names_the_triggers_and_fills_the_template(causal_backend):
    compiled = compile_template("(2, sub, \"was born in\", 1, obj)", causal_backend.tokenizer, "causal")
    ids = [token_id(causal_backend, w) for w in ("famous", "poet", "city")]
    method = AutoPrompt(3, causal_backend.hidden_size, embed=causal_backend.embed, trigger_ids=torch.tensor(ids))
    info = method.saved_info(compiled)["triggers"]
    assert info["ids"] == ids
    assert info["tokens"] == ["Ġfamous", "Ġpoet", "Ġcity"]
    assert info["text"] == "famous poet [X] was born in city [Y]"


# ---------------------------------------------------------------------------------------------
# Candidate filters
# ---------------------------------------------------------------------------------------------


def test_filters_exclude_special_tokens_gold_objects_and_optionally_capitals(backend):
    tok = backend.tokenizer
    n_rows = backend.model.get_input_embeddings().weight.shape[0]
    train = [Fact("Dante", "Paris"), Fact("Hugo", "Rome")]
    keep = allowed_tokens(tok, n_rows, train)
    no_caps = allowed_tokens(tok, n_rows, train, capitals=False)
    assert keep.shape == (n_rows,) and keep.dtype == torch.bool
    for i in tok.all_special_ids:
        assert not keep[i] and not no_caps[i], tok.convert_ids_to_tokens(i)
    for word in ("Paris", "Rome"):  # gold objects, with and without a leading space
        for lead in (False, True):
            ids = encode_words(tok, word, lead, True)
            if len(ids) == 1:
                assert not keep[ids[0]], (word, lead)
    for word in ("the", "city", "born"):
        assert keep[token_id(backend, word)] and no_caps[token_id(backend, word)], word
    for word in ("Berlin", "Dante"):  # capitalised, not gold: allowed unless --no-capitals
        assert keep[token_id(backend, word)] and not no_caps[token_id(backend, word)], word
    if backend.kind == "masked":  # sub-words are allowed, as in AutoPrompt
        assert keep[tok.convert_tokens_to_ids("##ville")]
    assert int(no_caps.sum()) < int(keep.sum()) < n_rows


def test_flip_candidates_follow_the_gradient_and_skip_banned_and_current():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [-2.0, 0.0]])
    grad = torch.tensor([1.0, 0.5])  # -(e . g): 2.0 for row 4, 1.0 for row 2, 0.5 for row 3, ...
    allowed = torch.tensor([True, True, True, True, False])
    assert flip_candidates(table, grad, allowed, current=0, k=2) == [2, 3]
    assert flip_candidates(table, grad, allowed, current=2, k=10) == [3, 1, 0]  # never current, never banned


def test_flip_losses_in_one_pass_equal_one_trial_at_a_time(backend):
    cands, compiled, method = setup(backend)
    batch = collate(compiled, [Fact(s, "Paris") for s in SUBJECTS[:5]], cands, backend.pad_id)
    tokens = [token_id(backend, w) for w in ("city", "born", "capital", "language", "died")]
    start = method.trigger_ids.clone()
    batched = flip_losses(backend, method, batch, cands, 1, tokens, max_rows=10)  # two trials a pass, three passes
    one_by_one = []
    for t in tokens:
        method.trigger_ids[1] = t
        with torch.no_grad():
            one_by_one.append(batch_loss(backend, method.prompt_inputs(), batch, cands).item())
        method.trigger_ids.copy_(start)
    assert batched == pytest.approx(one_by_one, rel=1e-5)
    assert len(set(round(x, 4) for x in batched)) == len(tokens)  # the trials really differ
    assert torch.equal(method.trigger_ids, start)  # the search's state is untouched


def test_batch_loss_takes_one_prompt_for_all_rows_or_one_per_row(backend):
    cands, compiled, method = setup(backend)
    facts = [Fact(s, w) for s, w in zip(SUBJECTS[:4], CANDIDATES, strict=False)]
    batch = collate(compiled, facts, cands, backend.pad_id)
    shared = method.virtual_embeddings()
    with torch.no_grad():
        loss = batch_loss(backend, PromptInputs(shared), batch, cands)
        per_row = batch_loss(backend, PromptInputs(shared.expand(len(facts), -1, -1)), batch, cands)
        (scores,) = backend.score([batch], method.prompt_inputs(), cands)
    assert loss.item() == pytest.approx(per_row.item(), rel=1e-5)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(scores, batch.gold).item(), rel=1e-6)


def test_fit_is_the_trigger_search(causal_backend, tmp_path):
    """`AutoPrompt.fit` and `fit` (a FitTask) run search_triggers with the same settings: the same triggers and log."""
    backend = causal_backend
    cands, compiled, _ = setup(backend)
    train, dev = constant_object_problem(backend, cands)
    config = TriggerSearchConfig(iterations=5, top_k=4, batch_size=5, patience=0, seed=4)
    searched = AutoPrompt.create(backend, compiled, MANUAL)
    by_search = search_triggers(backend, searched, FitTask(compiled, train, dev, cands, config, log_path=tmp_path / "search"))
    fitted = AutoPrompt.create(backend, compiled, MANUAL)
    by_fit = fitted.fit(backend, FitTask(compiled, train, dev, cands, config, log_path=tmp_path / "fit"))
    task = FitTask(compiled, train, dev, cands, config, AutoPrompt, AutoPromptConfig(), MANUAL, tmp_path / "pipeline")
    fitted_by_task = fit(backend, task)
    prompt, by_pipeline = fitted_by_task.prompt, fitted_by_task.result
    assert isinstance(prompt, AutoPrompt)
    assert by_search == by_fit == by_pipeline
    assert searched.trigger_ids.tolist() == fitted.trigger_ids.tolist() == prompt.trigger_ids.tolist()
    assert (tmp_path / "search").read_text() == (tmp_path / "fit").read_text() == (tmp_path / "pipeline").read_text()


def test_search_only_ever_picks_allowed_tokens(causal_backend, tmp_path):
    backend = causal_backend
    cands, compiled, method = setup(backend)
    train, dev = constant_object_problem(backend, cands)
    config = TriggerSearchConfig(iterations=8, top_k=10, batch_size=5, patience=0, capitals=False, seed=3)
    log = tmp_path / "log.jsonl"
    search_triggers(backend, method, FitTask(compiled, train, dev, cands, config, log_path=log))
    allowed = allowed_tokens(backend.tokenizer, backend.model.get_input_embeddings().weight.shape[0], train, False)
    picked = [e["token"] for e in map(json.loads, log.read_text().splitlines()[1:]) if e["flipped"]]
    assert picked, "the search flipped no trigger at all"
    for i in picked + method.trigger_ids.tolist():
        assert allowed[i], backend.tokenizer.convert_ids_to_tokens(i)
        assert not backend.tokenizer.convert_ids_to_tokens(i).lstrip("Ġ")[:1].isupper()


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def test_search_lowers_the_loss_and_raises_p1(backend, tmp_path):
    """A learnable relation: the triggers learn to put first the one object, which the start triggers rank midway."""
    cands, compiled, method = setup(backend)
    train, dev = constant_object_problem(backend, cands)
    start_dev = evaluate_facts(backend, method, compiled, dev, cands).metrics
    start_loss = full_loss(backend, method, compiled, train, cands)
    before_lm = {k: v.clone() for k, v in backend.model.state_dict().items()}
    log = tmp_path / "log.jsonl"
    n = 12
    config = TriggerSearchConfig(iterations=n, top_k=10, batch_size=5, patience=0, seed=1)
    result = search_triggers(backend, method, FitTask(compiled, train, dev, cands, config, log_path=log))

    assert start_dev["p1"] <= 20 and result.best_dev["p1"] >= start_dev["p1"] + 50, (start_dev, result)
    assert full_loss(backend, method, compiled, train, cands) < start_loss
    assert result.best_step > 0 and result.steps == n and not result.stopped_early
    # the method holds the best-on-dev triggers
    assert evaluate_facts(backend, method, compiled, dev, cands).metrics == result.best_dev
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries[0]["step"] == 0 and entries[0]["dev_p1"] == start_dev["p1"]
    assert [e["step"] for e in entries] == list(range(n + 1))
    assert [e["slot"] for e in entries[1:]] == [i % compiled.n_virtual for i in range(n)]
    for e in entries[1:]:  # a flip only when it lowers the batch loss; dev is evaluated after each flip
        assert e["flipped"] == (e["new_loss"] < e["loss"]) == ("dev_p1" in e)
    assert next(e for e in entries if e["step"] == result.best_step)["dev_p1"] == result.best_dev["p1"]
    # the LM is frozen and untouched
    for k, v in backend.model.state_dict().items():
        assert torch.equal(v, before_lm[k]), k
    assert all(p.grad is None and not p.requires_grad for p in backend.model.parameters())


def test_early_stopping_keeps_the_best_triggers(causal_backend):
    backend = causal_backend
    cands, compiled, method = setup(backend)
    train = [Fact(s, "Paris") for s in SUBJECTS[:8]]
    start = method.trigger_ids.clone()
    config = TriggerSearchConfig(iterations=50, top_k=1, batch_size=4, patience=2, seed=1)
    result = search_triggers(backend, method, FitTask(compiled, train, train, cands, config))
    assert result.stopped_early and result.steps < 50
    if result.best_step == 0:
        assert torch.equal(method.trigger_ids, start)


def test_same_seed_same_triggers_other_seed_other_search(causal_backend, tmp_path):
    backend = causal_backend
    cands, compiled, _ = setup(backend)
    train, dev = constant_object_problem(backend, cands)

    def run(seed: int, name: str):
        method = AutoPrompt.create(backend, compiled, MANUAL)
        config = TriggerSearchConfig(iterations=8, top_k=5, batch_size=3, patience=0, seed=seed)
        result = search_triggers(backend, method, FitTask(compiled, train, dev, cands, config, log_path=tmp_path / name))
        return method.trigger_ids.tolist(), result, (tmp_path / name).read_text()

    a, b, c = run(5, "a"), run(5, "b"), run(6, "c")
    assert a == b
    assert a[2] != c[2]


@pytest.mark.parametrize(("slots", "rows"), [(2, None), (3, None), (3, 20)])
def test_searches_in_step_find_what_each_finds_alone(backend, slots, rows, tmp_path, monkeypatch):
    """A pack of AutoPrompt fits (fit_pack -> search_together) shares each iteration's gradient pass and re-scoring
    pass among the searches; each search still finds, flips, checks dev and stops as it does alone. In float32 its
    losses agree within 1e-5 (the sums come in another order when a pass has more rows), every decision exactly.
    The three searches end differently (early stop, all iterations, another template); with 2 slots the third
    takes the slot of the first to end; with passes of at most 20 rows the re-scoring takes several passes."""
    if rows:
        monkeypatch.setattr(autoprompt, "PACK_ROWS", rows)
    cands = build_candidates(backend.tokenizer, CANDIDATES)
    train, dev = constant_object_problem(backend, cands)
    other = {"causal": "(1, sub, 3, obj)", "masked": "(1, sub, 3, obj, 1)"}[backend.kind]
    settings = [
        (DEFAULT_SHAPES[backend.kind], train, dev, TriggerSearchConfig(iterations=40, top_k=1, batch_size=4,
                                                                        patience=2, seed=1)),
        (DEFAULT_SHAPES[backend.kind], train, dev, TriggerSearchConfig(iterations=7, top_k=5, batch_size=3,
                                                                        patience=0, seed=5)),
        (other, train[:6], dev, TriggerSearchConfig(iterations=6, top_k=4, batch_size=4, patience=0, seed=2)),
    ]

    def tasks(tag: str) -> list[FitTask]:
        return [FitTask(compile_template(t, backend.tokenizer, backend.kind), tr, dv, cands, c, AutoPrompt, None, MANUAL,
                        tmp_path / f"{tag}-{k}.jsonl") for k, (t, tr, dv, c) in enumerate(settings)]

    alone = [fit(backend, task) for task in tasks("alone")]
    together = dict(fit_pack(backend, tasks("pack"), slots=slots))
    assert sorted(together) == [0, 1, 2]
    assert [a.result.stopped_early for a in alone] == [True, False, False]
    for k, solo in enumerate(alone):
        a, b = solo.result, together[k].result
        assert (a.best_step, a.steps, a.stopped_early, a.best_dev["p1"]) == \
            (b.best_step, b.steps, b.stopped_early, b.best_dev["p1"]), k
        assert a.best_dev["mrr"] == pytest.approx(b.best_dev["mrr"], abs=1e-5)
        assert together[k].prompt.trigger_ids.tolist() == solo.prompt.trigger_ids.tolist()
        logs = [[json.loads(line) for line in (tmp_path / f"{tag}-{k}.jsonl").read_text().splitlines()[1:]]
                for tag in ("alone", "pack")]
        assert [(e["step"], e["slot"], e["token"], e["flipped"], e.get("dev_p1")) for e in logs[0]] == \
            [(e["step"], e["slot"], e["token"], e["flipped"], e.get("dev_p1")) for e in logs[1]]
        for x, y in zip(*logs, strict=True):
            # 1e-5, and the log rounds to 5 decimals: two values 1e-6 apart can print 1e-5 apart
            assert (x["loss"], x["new_loss"]) == pytest.approx((y["loss"], y["new_loss"]), abs=2e-5)


# ---------------------------------------------------------------------------------------------
# Saved triggers, the pipeline and the CLI
# ---------------------------------------------------------------------------------------------


def make_lama(root: Path) -> Path:
    """One relation whose train/dev/test objects are two candidates."""
    def pairs(subjects):
        return [(s, ["Paris", "Rome"][i % 2]) for i, s in enumerate(subjects)]

    write_jsonl(root / "relations" / "relations.jsonl",
                [{"relation": "P19", "template": MANUAL, "label": "place of birth", "type": "N-1"}])
    for split, subjects in (("train", SUBJECTS[:8]), ("dev", SUBJECTS[8:12]), ("test_34k", SUBJECTS[10:])):
        write_jsonl(root / "trex" / split / "P19.jsonl",
                    [{"predicate_id": "P19", "sub_label": s, "obj_label": o} for s, o in pairs(subjects)])
    (root / "vocab").mkdir(parents=True, exist_ok=True)
    (root / "vocab" / "common_vocab_cased.txt").write_text("\n".join(CANDIDATES) + "\n", encoding="utf-8")
    return root


def test_saved_triggers_reload_and_reevaluate_identically(backend, tmp_path):
    data = LamaData(make_lama(tmp_path / "lama"))
    cands = build_candidates(backend.tokenizer, data.vocab_words("common"))
    config = TriggerSearchConfig(iterations=6, top_k=5, batch_size=4, patience=0, seed=2)
    run_config = RunConfig.of("train", backend, data, cands, method="autoprompt", split="test_34k", vocab="common",
                              batch_size=128, seed=2, method_config={"init": "neutral"}, train=config.__dict__)
    run = RunFolder(tmp_path / "run", run_config.to_dict())
    results = train_here(backend, data, ["P19"], cands, run, "autoprompt", AutoPromptConfig(), config,
                         load_template_spec(None, "autoprompt"))
    (row,) = results["relations"]
    assert "manual_p1" in row and "dev_p1" in row

    folder = run.root / "P19"
    saved = json.loads((folder / "config.json").read_text())
    triggers = saved["triggers"]
    assert saved["method"] == "autoprompt" and saved["train"] == config.__dict__
    assert len(triggers["ids"]) == len(triggers["tokens"]) == saved["n_virtual"]
    assert triggers["tokens"] == backend.tokenizer.convert_ids_to_tokens(triggers["ids"])
    assert "[X]" in triggers["text"] and "[Y]" in triggers["text"]
    tensors = load_file(str(folder / "prompt.safetensors"))
    assert tensors["method.trigger_ids"].tolist() == triggers["ids"]
    table = backend.model.get_input_embeddings().weight.detach().float()
    assert torch.equal(tensors["virtual_embeddings"], table[torch.tensor(triggers["ids"])])

    (again,) = reevaluate_run(backend, data, run.root, cands)
    assert {k: again[k] for k in ("p1", "p10", "mrr")} == {k: row[k] for k in ("p1", "p10", "mrr")}


def test_cli_train_autoprompt_then_eval_prompts(tiny_causal_dir, tmp_path):
    lama = make_lama(tmp_path / "lama")
    out = tmp_path / "run"
    res = CliRunner().invoke(cli.app, [
        "train", "--method", "autoprompt", "--model", str(tiny_causal_dir), "--data", str(lama), "--relation", "P19",
        "--iterations", "4", "--top-k", "3", "--batch-size", "4", "--no-capitals", "--dtype", "float32",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "autoprompt"
    assert cfg["train"] == {"iterations": 4, "top_k": 3, "batch_size": 4, "patience": 10, "capitals": False, "dev_size": 0,
                            "seed": 13}
    assert len(json.loads((out / "P19" / "config.json").read_text())["triggers"]["ids"]) == 6
    res = CliRunner().invoke(cli.app, ["eval", "--prompts", str(out)])
    assert res.exit_code == 0, res.output
    assert "1 of 1 relations reproduce the saved test figures exactly" in res.output


@pytest.mark.parametrize("option", ["--iterations", "--top-k"])
def test_cli_bad_search_settings_are_one_error_line(option, tmp_path):
    proc = cli_in_process("train", "--method", "autoprompt", "--relation", "P19", option, "0",
                   "--data", str(make_lama(tmp_path / "lama")))
    assert_user_error(proc, f"{option} must be at least 1")


# ---------------------------------------------------------------------------------------------
# Starting from the manual prompt (--init manual)
# ---------------------------------------------------------------------------------------------


def test_word_slots_start_as_their_words_and_the_rest_as_the(causal_backend):
    backend = causal_backend
    compiled = compile_template('(2, sub, ["was born in"], obj)', backend.tokenizer, "causal")
    method = AutoPrompt.create(backend, compiled, MANUAL)
    words = backend.tokenizer.encode(" was born in", add_special_tokens=False)
    assert method.trigger_ids.tolist() == [token_id(backend, "the")] * 2 + words
    info = method.saved_info(compiled)["triggers"]
    assert info["text"] == "the the [X] was born in [Y]"


def test_init_manual_starts_the_search_exactly_at_the_manual_prompt(backend, tmp_path):
    cands = build_candidates(backend.tokenizer, CANDIDATES)
    config = AutoPromptConfig(init="manual")
    manual_text = "[X] was born in the city of [Y] ."  # six words to search from
    train, dev = constant_object_problem(backend, cands, config, manual_text)
    default = compile_template(DEFAULT_SHAPES[backend.kind], backend.tokenizer, backend.kind).template
    assert AutoPrompt.relation_template(default, manual_text, backend.kind, AutoPromptConfig()) is default
    template = AutoPrompt.relation_template(default, manual_text, backend.kind, config)
    assert template.source == ('(sub, ["was born in the city of"], obj, ".")' if backend.kind == "masked"
                               else '(sub, ["was born in the city of"], obj)')
    compiled = compile_template(template, backend.tokenizer, backend.kind)
    method = AutoPrompt.create(backend, compiled, manual_text, config)
    manual = evaluate_facts(backend, get_method("manual")(0, backend.hidden_size),
                            compile_template(manual_text, backend.tokenizer, backend.kind), dev, cands)
    start = evaluate_facts(backend, method, compiled, dev, cands)
    assert start.ranks == manual.ranks  # the same prompt, now as triggers
    start_loss = full_loss(backend, method, compiled, train, cands)
    log = tmp_path / "log.jsonl"
    search = TriggerSearchConfig(iterations=9, top_k=10, batch_size=5, patience=0, seed=1)
    result = search_triggers(backend, method, FitTask(compiled, train, dev, cands, search, log_path=log))
    assert json.loads(log.read_text().splitlines()[0])["dev_p1"] == manual.metrics["p1"]
    assert result.best_dev["p1"] > manual.metrics["p1"]  # the manual words rank the object midway: room to gain
    assert full_loss(backend, method, compiled, train, cands) < start_loss


def test_cli_init_manual_trains_from_the_manual_prompt_and_reloads(tiny_causal_dir, tmp_path):
    lama = make_lama(tmp_path / "lama")
    out = tmp_path / "run"
    res = CliRunner().invoke(cli.app, [
        "train", "--method", "autoprompt", "--init", "manual", "--model", str(tiny_causal_dir), "--data", str(lama),
        "--relation", "P19", "--iterations", "3", "--top-k", "3", "--batch-size", "4", "--dtype", "float32",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "P19" / "config.json").read_text())
    assert saved["template"] == '(sub, ["was born in"], obj)' and saved["method_config"] == {"init": "manual"}
    assert saved["n_virtual"] == len(saved["triggers"]["ids"]) == 3
    log = [json.loads(line) for line in (out / "P19" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["dev_p1"] == json.loads((out / "P19" / "metrics.json").read_text())["manual_dev_p1"]
    res = CliRunner().invoke(cli.app, ["eval", "--prompts", str(out)])
    assert res.exit_code == 0, res.output
    assert "1 of 1 relations reproduce the saved test figures exactly" in res.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["--init", "manual", "--template", "(3, sub, obj)"], "--init manual builds each relation's template"),
    (["--init", "vocab"], "unknown autoprompt init 'vocab': expected one of neutral, manual"),
])
def test_cli_bad_init_is_one_error_line(args, fragment, tmp_path):
    proc = cli_in_process("train", "--method", "autoprompt", "--relation", "P19", *args,
                   "--data", str(make_lama(tmp_path / "lama")))
    assert_user_error(proc, fragment)


def test_train_packs_autoprompt_searches_and_refuses_a_pack_for_finetune(tiny_causal_dir, tmp_path):
    """`probe train --method autoprompt --pack 2` runs the relations' searches in step and writes what --pack 1 does:
    the same triggers and test figures per relation (float32); finetune, one LM per fit, refuses --pack 2."""
    lama = make_lama(tmp_path / "lama")
    rows = [{"relation": r, "template": MANUAL, "label": r, "type": "N-1"} for r in ("P19", "P20")]
    write_jsonl(lama / "relations" / "relations.jsonl", rows)
    for split in ("train", "dev", "test_34k"):  # P20: P19's facts, objects swapped
        facts = [json.loads(line) for line in (lama / "trex" / split / "P19.jsonl").read_text().splitlines()]
        swap = {"Paris": "Rome", "Rome": "Paris"}
        write_jsonl(lama / "trex" / split / "P20.jsonl",
                    [{**f, "predicate_id": "P20", "obj_label": swap[f["obj_label"]]} for f in facts])
    runs = {}
    for pack in (1, 2):
        out = tmp_path / f"pack{pack}"
        proc = cli_in_process("train", "--model", str(tiny_causal_dir), "--dtype", "float32", "--data", str(lama),
                              "-r", "P19,P20", "--method", "autoprompt", "--iterations", "6", "--top-k", "4",
                              "--batch-size", "3", "--vocab", "common", "--pack", str(pack), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        results = json.loads((out / "results.json").read_text())
        assert results["config"]["pack"] == pack
        runs[pack] = {r: (json.loads((out / r / "config.json").read_text())["triggers"]["ids"],
                          json.loads((out / r / "metrics.json").read_text())["p1"]) for r in ("P19", "P20")}
    assert runs[1] == runs[2]
    proc = cli_in_process("train", "--model", str(tiny_causal_dir), "--data", str(lama), "-r", "P19",
                          "--method", "finetune", "--pack", "2", "--out", str(tmp_path / "ft"))
    assert_user_error(proc, "--pack applies to the methods whose fits share passes", "'finetune' is fit one relation")
    assert not (tmp_path / "ft").exists()
