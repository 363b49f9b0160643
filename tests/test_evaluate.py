"""probe.batching, probe.evaluator and `probe eval`'s cells: batches, filtering, and metrics equal to a by-hand forward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eval_here, make_fake_lama

from probe.backends.llama import _distinct_tokens_after
from probe.batching import collate, filter_facts, make_batches, relation_facts
from probe.data import Fact, LamaData
from probe.errors import ProbeError
from probe.evaluator import evaluate_facts
from probe.methods import METHODS, get_method
from probe.methods.base import PromptMethod
from probe.methods.manual import ManualPrompt
from probe.metrics import relation_metrics
from probe.runs import RunConfig, RunFolder
from probe.templates import compile_template
from probe.vocab import build_candidates

P19 = "[X] was born in [Y] ."
WORDS = ["Paris", "France", "Rome", "Italy", "Berlin", "Germany", "Florence", "London", "Madrid", "Spain",
         "Tokyo", "Japan", "Lyon", "Milan", "city", "capital", "language"]
FACTS = [
    Fact("Dante Alighieri Parisville", "Florence"),
    Fact("Dante", "Florence"),
    Fact("Victor Hugo", "Paris"),
    Fact("Rome", "Italy"),
    Fact("the city of Milan", "Milan"),
    Fact("Lyon", "France"),
    Fact("Victor", "Xylophonia"),  # not a candidate
]


@pytest.fixture(scope="module")
def cands(masked_backend):
    return build_candidates(masked_backend.tokenizer, WORDS)


# ---- batching -------------------------------------------------------------------------------


def test_filter_facts_drops_non_candidates(cands):
    kept, dropped = filter_facts(FACTS, cands)
    assert kept == FACTS[:6]
    assert dropped == 1
    assert filter_facts([], cands) == ([], 0)


def test_collate_pads_right_and_maps_gold(masked_backend, cands):
    tok = masked_backend.tokenizer
    compiled = compile_template("(2, sub, obj, 1)", tok, "masked")
    facts = [Fact("Dante", "Florence"), Fact("Victor Hugo", "Paris")]
    batch = collate(compiled, facts, cands, masked_backend.pad_id)
    assert batch.input_ids.shape == (2, 8)  # [CLS] V V Victor Hugo [MASK] V [SEP]
    assert batch.attention_mask.tolist() == [[1] * 7 + [0], [1] * 8]
    assert batch.input_ids[0, 7] == tok.pad_token_id
    assert batch.virtual_mask.tolist() == [[False, True, True, False, False, True, False, False],
                                           [False, True, True, False, False, False, True, False]]
    assert batch.target.tolist() == [4, 5]
    assert batch.gold.tolist() == [cands.index["Florence"], cands.index["Paris"]]
    assert batch.facts == facts


def test_make_batches_sorts_by_length(masked_backend, cands):
    compiled = compile_template(P19, masked_backend.tokenizer, "masked")
    facts, _ = filter_facts(FACTS, cands)
    lengths = {f: len(compiled.encode(f.sub).input_ids) for f in facts}
    batches = make_batches(compiled, facts, cands, batch_size=2, pad_id=0)
    assert [len(b.facts) for b in batches] == [2, 2, 2]
    order = [f for b in batches for f in b.facts]
    assert sorted(order, key=FACTS.index) == facts
    assert [lengths[f] for f in order] == sorted(lengths.values())
    padding = sum(int((b.attention_mask == 0).sum()) for b in batches)
    # sorted chunks of two: padding is the sum of the gaps inside each pair
    srt = sorted(lengths.values())
    assert padding == sum(srt[i + 1] - srt[i] for i in range(0, len(srt), 2))
    unsorted = collate(compiled, facts, cands, 0)
    assert padding < int((unsorted.attention_mask == 0).sum())


def test_make_batches_bounds_padding(masked_backend, cands):
    """A long subject starts its own batch instead of padding a batch of short ones."""
    compiled = compile_template(P19, masked_backend.tokenizer, "masked")
    facts = [Fact(s, "Paris") for s in ["Dante", "Rome", "Lyon", "Milan", "Victor Hugo", "the city of Milan and Rome"]]
    lengths = {f: len(compiled.encode(f.sub).input_ids) for f in facts}
    for max_padding in (0.0, 0.1, 0.5):
        batches = make_batches(compiled, facts, cands, 8, 0, max_padding=max_padding)
        assert sorted((f for b in batches for f in b.facts), key=facts.index) == facts
        for b in batches:
            real = int(b.attention_mask.sum())
            assert b.attention_mask.numel() <= (1 + max_padding) * real
    assert len(make_batches(compiled, facts, cands, 8, 0, max_padding=0.0)) == len(set(lengths.values()))
    assert len(make_batches(compiled, facts, cands, 8, 0, max_padding=10.0)) == 1


def test_make_batches_with_a_generator_is_a_seeded_shuffle(masked_backend, cands):
    compiled = compile_template(P19, masked_backend.tokenizer, "masked")
    facts, _ = filter_facts(FACTS, cands)
    plain = [f for b in make_batches(compiled, facts, cands, 2, 0) for f in b.facts]

    def shuffled(seed):
        batches = make_batches(compiled, facts, cands, 2, 0, torch.Generator().manual_seed(seed))
        return [f for b in batches for f in b.facts]

    runs = [shuffled(s) for s in range(4)]
    assert shuffled(0) == runs[0]  # same seed, same order
    assert all(sorted(r, key=facts.index) == facts for r in runs)  # every fact exactly once
    assert any(r != plain for r in runs)


def test_make_batches_last_batch_is_smaller(masked_backend, cands):
    compiled = compile_template(P19, masked_backend.tokenizer, "masked")
    facts, _ = filter_facts(FACTS, cands)
    assert [len(b.facts) for b in make_batches(compiled, facts, cands, 4, 0)] == [4, 2]
    assert make_batches(compiled, [], cands, 4, 0) == []


# ---- evaluate_facts == by hand --------------------------------------------------------------


def _by_hand(backend, template, facts, cands):
    """Each fact alone through the full HF forward; rank of the gold among the candidate logits."""
    compiled = compile_template(template, backend.tokenizer, backend.kind)
    ranks, top1 = [], []
    for f in facts:
        enc = compiled.encode(f.sub)
        with torch.no_grad():
            logits = backend.model(input_ids=torch.tensor([enc.input_ids])).logits[0, enc.target]
        scores = logits[cands.token_ids]
        gold = scores[cands.index[f.obj]]
        ranks.append(int((scores > gold).sum()) + 1)
        top1.append(cands.words[int(scores.argmax())])
    return ranks, top1


@pytest.mark.parametrize("which", ["masked", "causal"])
def test_evaluate_facts_equals_by_hand(request, which):
    backend = request.getfixturevalue(f"{which}_backend")
    cands = build_candidates(backend.tokenizer, WORDS)
    facts, _ = filter_facts(FACTS, cands)
    assert len(facts) == 6
    compiled = compile_template(P19, backend.tokenizer, backend.kind)
    method = ManualPrompt(0, backend.hidden_size)
    method.train()
    result = evaluate_facts(backend, method, compiled, facts, cands, batch_size=4)
    assert method.training  # restored
    ranks, top1 = _by_hand(backend, P19, result.facts, cands)
    assert sorted(result.facts, key=facts.index) == facts
    assert result.ranks == ranks
    assert [t[0] for t in result.top10] == top1
    assert all(len(t) == 10 for t in result.top10)
    assert result.metrics == pytest.approx(relation_metrics(ranks))
    assert result.metrics["p1"] == pytest.approx(100 * sum(r == 1 for r in ranks) / 6)
    assert result.metrics["mrr"] == pytest.approx(sum(1 / r for r in ranks) / 6)
    preds = result.predictions()
    assert preds[0] == {"sub": result.facts[0].sub, "obj": result.facts[0].obj, "rank": ranks[0],
                        "top10": result.top10[0]}


def test_facts_sharing_a_subject_run_once(causal_backend, monkeypatch):
    """N-M relations repeat subjects: each distinct input runs once, every fact still gets its own rank."""
    cands = build_candidates(causal_backend.tokenizer, WORDS)
    facts = [Fact("Dante", "Florence"), Fact("Rome", "Italy"), Fact("Dante", "Paris"), Fact("Dante", "Milan")]
    compiled = compile_template(P19, causal_backend.tokenizer, "causal")
    seen = []
    real = causal_backend.score
    monkeypatch.setattr(causal_backend, "score", lambda batches, *a: seen.extend(f for b in batches for f in b.facts)
                        or real(batches, *a))
    result = evaluate_facts(causal_backend, ManualPrompt(0, causal_backend.hidden_size), compiled, facts, cands, 8)
    assert sorted(f.sub for f in seen) == ["Dante", "Rome"]
    assert sorted(result.facts, key=facts.index) == facts
    ranks, top1 = _by_hand(causal_backend, P19, result.facts, cands)
    assert result.ranks == ranks and [t[0] for t in result.top10] == top1
    assert len(set(ranks)) > 1  # the three Dante facts differ in rank


P36 = "The capital of [X] is [Y] ."


@pytest.mark.parametrize(("template", "method_name", "expected"), [
    (P36, "manual", 3), ("(3, sub, 3, obj)", "ptuning", 3), ("(2, 'The capital of', sub, obj)", "ptuning", 5),
])
def test_a_start_every_input_shares_runs_once(causal_backend, monkeypatch, template, method_name, expected):
    """Words or virtual tokens before [X] run once per relation; ranks equal those of the full inputs."""

    b = causal_backend
    cands = build_candidates(b.tokenizer, WORDS)
    facts, _ = filter_facts(FACTS, cands)
    compiled = compile_template(template, b.tokenizer, "causal")
    torch.manual_seed(0)
    method = get_method(method_name).create(b, compiled, P36)
    method.eval()
    batches = make_batches(compiled, facts, cands, 4, b.pad_id)
    shared = b.shared_starts(batches, method.prompt_inputs())
    assert shared is not None and shared.common == expected
    with_sharing = evaluate_facts(b, method, compiled, facts, cands, batch_size=4)
    monkeypatch.setattr(b, "shared_starts", lambda *a: None)
    without = evaluate_facts(b, method, compiled, facts, cands, batch_size=4)
    assert with_sharing.facts == without.facts and with_sharing.ranks == without.ranks
    assert with_sharing.top10 == without.top10


def test_no_shared_start_where_inputs_differ_from_the_first_token(causal_backend, masked_backend):
    cands = build_candidates(causal_backend.tokenizer, WORDS)
    facts = [Fact("Rome", "Italy"), Fact("Lyon", "France"), Fact("Victor Hugo", "Paris")]
    manual = ManualPrompt(0, causal_backend.hidden_size)
    p19 = make_batches(compile_template(P19, causal_backend.tokenizer, "causal"), facts, cands, 4, causal_backend.pad_id)
    assert causal_backend.shared_starts(p19, manual.prompt_inputs()) is None
    masked = make_batches(compile_template(P36, masked_backend.tokenizer, "masked"), facts, cands, 4, masked_backend.pad_id)
    assert masked and not hasattr(masked_backend, "shared_starts")  # only the Llama backend shares starts
    # identical inputs share everything but their target
    same = [Fact("Rome", "Italy"), Fact("Rome", "Paris")]
    batches = make_batches(compile_template(P36, causal_backend.tokenizer, "causal"), same, cands, 4, causal_backend.pad_id)
    shared = causal_backend.shared_starts(batches, manual.prompt_inputs())
    assert shared.common == shared.start.length == int(batches[0].target[0]) == 4 and shared.row_start is None


@pytest.mark.parametrize(("template", "common"), [("(3, sub, 3, obj)", 3), ("(2, 'The capital of', sub, obj)", 5),
                                                  (P19, 0)])
def test_in_training_a_batch_runs_as_one_sequence_with_the_padded_loss_and_gradient(causal_backend, monkeypatch,
                                                                                     template, common):
    """While gradients flow, a batch's rows run as one sequence: the leading tokens they share (virtual ones too)
    once, then each row's tokens up to its target; the loss and the prompt's gradient are the padded batch's."""
    b = causal_backend
    cands = build_candidates(b.tokenizer, WORDS)
    facts, _ = filter_facts(FACTS, cands)
    compiled = compile_template(template, b.tokenizer, "causal")
    torch.manual_seed(0)
    method = get_method("ptuning" if template.startswith("(") else "manual").create(b, compiled, P19)
    (batch,) = make_batches(compiled, facts, cands, 8, b.pad_id, max_padding=10.0)  # one padded batch
    assert len(set(batch.target.tolist())) > 1  # rows of different lengths
    lengths = []
    run = b.forward._run
    monkeypatch.setattr(b.forward, "_run", lambda x, *a, **k: lengths.append(x.shape[:2]) or run(x, *a, **k))

    def loss_and_grad(score):
        params = [p for p in method.parameters() if p.requires_grad]
        (scores,) = score([batch], method.prompt_inputs(), cands)
        loss = torch.nn.functional.cross_entropy(scores.float(), batch.gold, reduction="sum")
        return loss.detach(), torch.autograd.grad(loss, params) if params else ()

    loss, grads = loss_and_grad(b.score_tokens)
    assert lengths == [(1, common + int((batch.target + 1 - common).sum()))]
    padded_loss, padded_grads = loss_and_grad(super(type(b), b).score_tokens)  # every row whole, padded
    assert lengths[1] == tuple(batch.input_ids.shape)
    torch.testing.assert_close(loss, padded_loss, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, padded_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert not grads or max(g.abs().max() for g in grads) > 0


@pytest.mark.parametrize("template", [P19, P36, "(3, sub, 3, obj)"])
def test_a_first_token_that_inputs_share_runs_once_per_distinct_token(causal_backend, monkeypatch, template):
    """Subjects that begin alike ("Dante", "Dante Alighieri") run their first token once, across batches;
    ranks and top-10 equal those of the full inputs, and each row continues its own start."""
    import probe.evaluator as ev

    b = causal_backend
    cands = build_candidates(b.tokenizer, WORDS)
    facts = [Fact(s, "Florence") for s in ("Dante", "Dante Alighieri", "Rome", "Victor Hugo", "Victor", "Rome city")]
    compiled = compile_template(template, b.tokenizer, "causal")
    torch.manual_seed(0)
    method = get_method("ptuning" if template.startswith("(") else "manual").create(b, compiled, template)
    method.eval()
    batches = make_batches(compiled, facts, cands, 2, b.pad_id, max_padding=0)
    shared = b.shared_starts(batches, method.prompt_inputs())
    first = [b.tokenizer.encode(f.sub, add_special_tokens=False)[0] for f in facts]
    common = {P19: 0, P36: 3}.get(template, 3)
    assert shared.common == common and shared.start.length == common + 1
    assert shared.start.keys[0].shape[0] == len(set(first)) == 3 and shared.row_start.shape == (len(facts),)
    with_sharing = evaluate_facts(b, method, compiled, facts, cands, batch_size=2)
    monkeypatch.setattr(b, "shared_starts", lambda *a: None)
    without = evaluate_facts(b, method, compiled, facts, cands, batch_size=2)
    assert with_sharing.facts == without.facts and with_sharing.ranks == without.ranks
    assert with_sharing.top10 == without.top10
    # the same scores; rows handed another row's start score differently
    def scores(start):
        monkeypatch.setattr(b, "shared_starts", lambda *a: start)
        with torch.no_grad():  # with gradients, only the start all of a batch's rows share
            return torch.cat([s for _, s in ev.scored_batches(b, method.prompt_inputs(), compiled, facts, cands, 2)])
    torch.testing.assert_close(scores(shared), scores(None), rtol=1e-4, atol=1e-4)
    swapped = scores(shared._replace(row_start=shared.row_start.roll(1)))
    assert (swapped - scores(None)).abs().max() > 1e-2


def test_distinct_start_length_is_the_one_that_saves_most():
    ids = torch.tensor([[1, 2, 3, 9], [1, 2, 4, 9], [1, 2, 5, 9], [7, 8, 6, 9]])
    virtual = torch.zeros_like(ids, dtype=torch.bool)
    # 1 token: 2 distinct of 4 rows saves 2 positions; 2 tokens: 2 distinct saves 4; 3 tokens: none
    assert _distinct_tokens_after(ids[:, :3], virtual[:, :3]) == 2
    assert _distinct_tokens_after(ids[:, :1], virtual[:, :1]) == 1
    assert _distinct_tokens_after(ids[:, 2:3], virtual[:, 2:3]) == 0  # 3, 4, 5, 6 all differ
    virtual[:, 1] = True  # a virtual token is not a real one to look up
    assert _distinct_tokens_after(ids[:, :3], virtual[:, :3]) == 1


def test_top10_with_fewer_candidates(masked_backend):
    cands = build_candidates(masked_backend.tokenizer, ["Paris", "Rome", "Florence"])
    compiled = compile_template(P19, masked_backend.tokenizer, "masked")
    result = evaluate_facts(masked_backend, ManualPrompt(0, 32), compiled, [Fact("Dante", "Rome")], cands)
    assert sorted(result.top10[0]) == ["Florence", "Paris", "Rome"]
    assert result.ranks[0] == result.top10[0].index("Rome") + 1


class FixedVirtual(PromptMethod):
    name = "fixed-test"

    def __init__(self, n_virtual, hidden_size):
        super().__init__(n_virtual, hidden_size)
        self.rows = torch.nn.Parameter(torch.randn(n_virtual, hidden_size, generator=torch.Generator().manual_seed(0)))

    def virtual_embeddings(self):
        return self.rows


def test_candidate_scores_put_virtual_rows_in_order(masked_backend, cands):
    b = masked_backend
    compiled = compile_template("(2, sub, 1, obj, 1)", b.tokenizer, "masked")
    facts = [Fact("Dante", "Florence"), Fact("Victor Hugo", "Paris")]
    batch = collate(compiled, facts, cands, b.pad_id)
    method = FixedVirtual(4, b.hidden_size)
    with torch.no_grad():
        (ours,) = b.score([batch], method.prompt_inputs(), cands)
        embeds = b.embed(batch.input_ids).clone()
        for i, f in enumerate(facts):
            for j, pos in enumerate(compiled.encode(f.sub).virtual_positions):
                embeds[i, pos] = method.rows[j]
        logits = b.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        ref = logits[torch.arange(2), batch.target][:, cands.token_ids]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        (plain,) = b.score([batch], ManualPrompt(0, b.hidden_size).prompt_inputs(), cands)
    assert not torch.allclose(ours, plain)


# ---- methods --------------------------------------------------------------------------------


def test_method_registry():
    assert get_method("manual") is ManualPrompt
    assert METHODS["manual"] is ManualPrompt
    with pytest.raises(ProbeError, match="unknown method 'no-such-method': expected one of .*manual"):
        get_method("no-such-method")
    with pytest.raises(ProbeError, match="without virtual tokens"):
        ManualPrompt(3, 32)
    assert ManualPrompt(0, 32).virtual_embeddings() is None


# ---- pipeline -------------------------------------------------------------------------------


def eval_config(backend, data, cands) -> dict:
    return RunConfig.of("eval", backend, data, cands, method="manual", split="test_34k", vocab="common",
                        batch_size=128).to_dict()


def test_relation_facts_strict_and_not(masked_backend, tmp_path):
    root = make_fake_lama(tmp_path, facts={"P19": [("Dante", "Xylophonia"), ("Victor", "Florence")],
                                           "P36": [("France", "Paris")]})
    data = LamaData(root)
    cands = build_candidates(masked_backend.tokenizer, ["Paris"])
    assert relation_facts(data, data.relation("P36"), "test_34k", cands, strict=True) == ([Fact("France", "Paris")], 0)
    assert relation_facts(data, data.relation("P19"), "test_34k", cands, strict=False) == ([], 2)
    with pytest.raises(ProbeError) as e:
        relation_facts(data, data.relation("P19"), "test_34k", cands, strict=True)
    assert str(e.value) == ("relation P19 has no test_34k facts left after dropping objects that are not single tokens "
                            "of the candidate vocabulary (2 dropped)")


def test_evaluate_manual_relations_end_to_end(masked_backend, fake_lama, tmp_path):
    b = masked_backend
    data = LamaData(fake_lama)
    cands = build_candidates(b.tokenizer, data.vocab_words())
    assert cands.words == ["Paris", "Rome", "Berlin", "Florence", "French", "Italian", "German", "English"]
    config = RunConfig.of("eval", b, data, cands, method="manual", split="test_34k", vocab="common", batch_size=2).to_dict()
    assert config["n_candidates"] == 8 and config["n_vocab_words"] == 8
    assert config["model_kind"] == "masked" and config["dtype"] == "float32" and config["method"] == "manual"
    run = RunFolder(tmp_path / "run", config)
    results = eval_here(b, data, ["P19", "P36", "P37"], cands, run, "test_34k", 2)
    rels = {r["relation"]: r for r in results["relations"]}
    assert list(rels) == ["P19", "P36", "P37"]
    assert rels["P19"]["n_facts"] == 2 and rels["P19"]["n_dropped"] == 1  # Besancon is no candidate; dup gone
    assert rels["P36"]["n_facts"] == 3 and rels["P36"]["n_dropped"] == 0
    assert rels["P37"]["n_facts"] == 4 and rels["P37"]["type"] == "N-M"
    for rid, row in rels.items():
        facts, _ = filter_facts(data.facts(rid), cands)
        ranks, _ = _by_hand(b, data.relation(rid).template, facts, cands)
        assert row["p1"] == pytest.approx(relation_metrics(ranks)["p1"]), rid
        assert row["mrr"] == pytest.approx(relation_metrics(ranks)["mrr"]), rid
        preds = [json.loads(x) for x in (run.root / rid / "predictions.jsonl").read_text().splitlines()]
        assert sorted(p["rank"] for p in preds) == sorted(ranks)
    assert results["summary"]["all"]["facts"] == 9
    micro = sum(r["p1"] * r["n_facts"] for r in rels.values()) / 9
    assert results["summary"]["all"]["micro_p1"] == pytest.approx(micro)


def test_evaluate_manual_relations_skips_empty_relation_when_several(masked_backend, tmp_path, capsys):
    b = masked_backend
    root = make_fake_lama(tmp_path / "lama", facts={"P19": [("Dante", "Xylophonia")], "P36": [("France", "Paris")]})
    data = LamaData(root)
    cands = build_candidates(b.tokenizer, data.vocab_words())
    run = RunFolder(tmp_path / "run", eval_config(b, data, cands))
    results = eval_here(b, data, ["P19", "P36"], cands, run, "test_34k")
    assert [r["relation"] for r in results["relations"]] == ["P36"]
    assert not run.is_done("P19")
    assert "warning: P19 has no test_34k facts left after filtering; skipped" in capsys.readouterr().err


def test_evaluate_manual_relations_resume_skips_finished(masked_backend, fake_lama, tmp_path, monkeypatch):
    b = masked_backend
    data = LamaData(fake_lama)
    cands = build_candidates(b.tokenizer, data.vocab_words())
    config = eval_config(b, data, cands)
    first = eval_here(b, data, ["P36"], cands, RunFolder(tmp_path / "run", config), "test_34k")
    import probe.commands.eval as command

    seen = []
    real = command.evaluate_ensemble
    monkeypatch.setattr(command, "evaluate_ensemble", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    run = RunFolder(tmp_path / "run", config, resume=True)
    again = eval_here(b, data, ["P36", "P37"], cands, run, "test_34k")
    assert len(seen) == 1 and len(seen[0]) == 4  # only P37 ran
    assert again["relations"][0] == first["relations"][0]
    assert [r["relation"] for r in again["relations"]] == ["P36", "P37"]
