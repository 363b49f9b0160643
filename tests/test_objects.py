"""Objects of any length (`--objects any`): the trie, the scores against a brute-force forward per candidate, the
exact single-token equivalence, length normalisation, the masked within-word l2r PLL, candidates files, training,
reporting and errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import assert_user_error, cli_in_process, make_fake_lama

from probe.backends.causal import CausalLM
from probe.batching import collate
from probe.data import Fact, LamaData
from probe.errors import ProbeError
from probe.evaluator import evaluate_facts
from probe.fit import FitTask, fit
from probe.methods import get_method
from probe.methods.manual import ManualPrompt
from probe.objects import ObjectsSpec, RelationCandidates, object_candidates, read_candidates_file
from probe.templates import compile_template
from probe.trainer import TrainConfig
from probe.vocab import build_candidates

CITIES = ["Paris", "London", "Buenos Aires", "Saint Petersburg", "Rome", "New York", "New Delhi", "Berlin",
          "Rio de Janeiro", "Florence"]
FACTS = [Fact("Albert Einstein", "Berlin"), Fact("Leo Tolstoy", "Saint Petersburg"), Fact("Borges", "Buenos Aires"),
         Fact("Dante", "Florence"), Fact("Victor Hugo", "Paris")]
P19 = "[X] was born in [Y] ."


def scores_of(backend, compiled, facts, candidates, prompt=None):
    prompt = prompt or ManualPrompt(0, backend.hidden_size).prompt_inputs()
    batch = collate(compiled, facts, candidates, backend.pad_id)
    with torch.no_grad():
        (scores,) = backend.score([batch], prompt, candidates)
    return scores


def brute_causal(backend, compiled, fact, seq) -> float:
    """log p(seq | prompt) from one plain transformers forward over prompt + seq."""
    enc = compiled.encode_fact(fact)
    ids = torch.tensor([enc.input_ids[: enc.target + 1] + list(seq)])
    with torch.no_grad():
        logp = backend.model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(logp[enc.target + i, t]) for i, t in enumerate(seq))


def brute_masked(backend, compiled, fact, seq) -> float:
    """Within-word l2r PLL: token i read with tokens < i filled in and tokens >= i masked, one forward each."""
    enc = compiled.encode_fact(fact)
    t, mask = enc.target, backend.tokenizer.mask_token_id
    total = 0.0
    for i, token in enumerate(seq):
        ids = torch.tensor([enc.input_ids[:t] + list(seq[:i]) + [mask] * (len(seq) - i) + enc.input_ids[t + 1:]])
        with torch.no_grad():
            logp = backend.model(input_ids=ids).logits[0, t + i].float().log_softmax(-1)
        total += float(logp[token])
    return total


# ---- the trie -----------------------------------------------------------------------------------


def test_causal_contexts_share_leading_tokens():
    sequences = [(5,), (7, 8), (7, 9), (7, 9, 4), (6, 1, 2)]
    from probe.objects import _contexts

    ctx = _contexts(sequences, "causal")
    # the root, then every proper prefix once: (7,) serves three candidates, (7, 9) two
    assert ctx.keys == [(), (7,), (7, 9), (6,), (6, 1)]
    assert len(ctx.edge_token) == 8  # 5, 7, 8, 9, 4, 6, 1, 2: (root, 7) is one edge for three candidates
    assert ctx.candidate_edges.tolist()[3][:3] == [1, 3, 4]
    tokens, sees, depth = ctx.tree
    assert tokens.tolist() == [7, 9, 6, 1]
    assert depth.tolist() == [1, 2, 1, 2]
    assert sees.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    edge = torch.arange(8, dtype=torch.float64)[None]
    assert ctx.sum_edges(edge).tolist() == [[0, 1 + 2, 1 + 3, 1 + 3 + 4, 5 + 6 + 7]]


def test_masked_contexts_are_length_and_filled_prefix():
    from probe.objects import _contexts

    ctx = _contexts([(5,), (7, 8), (7, 9), (6,)], "masked")
    assert ctx.keys == [(1, ()), (2, ()), (2, (7,))]
    assert ctx.edge_context.tolist() == [0, 1, 2, 2, 0]


# ---- scores: brute force ----------------------------------------------------------------------------


@pytest.mark.parametrize("generic", [False, True])
def test_causal_scores_equal_a_forward_per_candidate(causal_backend, generic):
    """The Llama backend's own forward, and the generic transformers path (cache + tree mask), against brute force."""
    b = causal_backend if not generic else CausalLM(causal_backend.model, causal_backend.tokenizer, "generic")
    oc = object_candidates(b.tokenizer, CITIES)
    assert max(len(s) for s in oc.sequences) >= 3 and len(oc.contexts("causal").keys) > 1
    compiled = compile_template(P19, b.tokenizer, "causal")
    with warnings.catch_warnings(record=True) as caught:  # the cache passed under the name this transformers reads
        warnings.simplefilter("always")
        scores = scores_of(b, compiled, FACTS, oc)
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message)] == []
    assert scores.dtype == torch.float64 and scores.shape == (len(FACTS), len(CITIES))
    for i, fact in enumerate(FACTS):
        for c, seq in enumerate(oc.sequences):
            assert scores[i, c].item() == pytest.approx(brute_causal(b, compiled, fact, seq), abs=2e-4)


def test_causal_scores_with_virtual_tokens(causal_backend):
    """A trained prompt's vectors go in as in the single-token path: the same scores as the filled-in embeddings."""
    b = causal_backend
    oc = object_candidates(b.tokenizer, CITIES)
    compiled = compile_template("(2, sub, 2, obj)", b.tokenizer, "causal")
    torch.manual_seed(1)
    vectors = torch.randn(4, b.hidden_size) * 0.02
    from probe.backends import PromptInputs

    scores = scores_of(b, compiled, FACTS[:2], oc, PromptInputs(vectors))
    for i, fact in enumerate(FACTS[:2]):
        enc = compiled.encode_fact(fact)
        for c, seq in enumerate(oc.sequences):
            ids = torch.tensor([enc.input_ids[: enc.target + 1] + list(seq)])
            embeds = b.embed(ids)
            embeds[0, enc.virtual_positions] = vectors.to(embeds.dtype)
            with torch.no_grad():
                logp = b.model(inputs_embeds=embeds).logits[0].float().log_softmax(-1)
            want = sum(float(logp[enc.target + k, t]) for k, t in enumerate(seq))
            assert scores[i, c].item() == pytest.approx(want, abs=2e-4)


def test_masked_scores_are_within_word_l2r_pll(masked_backend):
    b = masked_backend
    words = ["Paris", "Parisville", "Lyonvilleton", "Milaner", "Florence"]
    oc = object_candidates(b.tokenizer, words)
    assert max(len(s) for s in oc.sequences) >= 3  # WordPiece splits the unknown words
    compiled = compile_template("(2, sub, obj, 1)", b.tokenizer, "masked")
    facts = [Fact("Dante", "Florence"), Fact("Victor Hugo", "Paris")]
    scores = scores_of(b, compiled, facts, oc)
    for i, fact in enumerate(facts):
        for c, seq in enumerate(oc.sequences):
            assert scores[i, c].item() == pytest.approx(brute_masked(b, compiled, fact, seq), abs=2e-4)


# ---- exactness against the single-token path ------------------------------------------------------


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_single_token_candidates_rank_exactly_as_the_single_token_path(kind, causal_backend, masked_backend):
    b = causal_backend if kind == "causal" else masked_backend
    words = ["Paris", "London", "Rome", "Berlin", "France", "Italy", "Germany", "Spain", "city", "the", "a", "of"]
    single = build_candidates(b.tokenizer, words)
    assert len(single) >= 8
    anylen = object_candidates(b.tokenizer, single.words)  # the same candidates, as sequences of one token
    assert all(len(s) == 1 for s in anylen.sequences)
    facts = [Fact(s, o) for s, o in [("Dante", "Paris"), ("Victor Hugo", "Rome"), ("Goethe", "Berlin"),
                                      ("Italy", "Rome"), ("the city of Milan", "Italy"), ("Spain", "Spain")]]
    template = P19 if kind == "causal" else "[X] was born in [Y] ."
    compiled = compile_template(template, b.tokenizer, kind)
    manual = ManualPrompt(0, b.hidden_size)
    one = evaluate_facts(b, manual, compiled, facts, single)
    other = evaluate_facts(b, manual, compiled, facts, anylen)
    assert other.ranks == one.ranks
    assert other.top10 == one.top10
    assert other.metrics["by_length"] == {"1": {"facts": len(facts), "p1": one.metrics["p1"]}}


# ---- length normalisation and the loss ----------------------------------------------------------------


def test_length_norm_divides_by_token_count(causal_backend):
    b = causal_backend
    raw, normed = (object_candidates(b.tokenizer, CITIES, length_norm=n) for n in (False, True))
    compiled = compile_template(P19, b.tokenizer, "causal")
    s_raw, s_norm = scores_of(b, compiled, FACTS, raw), scores_of(b, compiled, FACTS, normed)
    lengths = torch.tensor([len(s) for s in raw.sequences], dtype=torch.float64)
    assert torch.equal(s_norm, s_raw / lengths)
    assert lengths.max() > 1


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_gold_loss_is_the_gold_objects_negative_log_likelihood(kind, causal_backend, masked_backend):
    b = causal_backend if kind == "causal" else masked_backend
    oc = object_candidates(b.tokenizer, CITIES)
    compiled = compile_template(P19, b.tokenizer, kind)
    facts = FACTS[1:4]
    batch = collate(compiled, facts, oc, b.pad_id)
    prompt = ManualPrompt(0, b.hidden_size).prompt_inputs()
    with torch.no_grad():
        loss = b.gold_loss(batch, prompt, oc)
        scores = scores_of(b, compiled, facts, oc)
    gold = [oc.index[f.obj] for f in facts]
    assert loss.tolist() == pytest.approx([-scores[i, g].item() for i, g in enumerate(gold)], abs=2e-4)
    normed = object_candidates(b.tokenizer, CITIES, length_norm=True)
    with torch.no_grad():
        loss_norm = b.gold_loss(batch, prompt, normed)
    assert loss_norm.tolist() == pytest.approx([x / len(oc.sequences[g]) for x, g in zip(loss.tolist(), gold, strict=True)],
                                                  abs=1e-5)


def test_a_prompt_trains_on_multi_token_objects(causal_backend):
    """ptuning with objects of any length: the trainer's loss is the gold's NLL, dev ranking selects, and the
    prompt learns to put one multi-token object first, which the untrained prompt does not."""
    b = causal_backend
    oc = object_candidates(b.tokenizer, ["New York", "Buenos Aires", "Saint Petersburg", "Rio de Janeiro"])
    assert min(len(s) for s in oc.sequences) >= 2
    subjects = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
    train = [Fact(s, "Buenos Aires") for s in subjects]
    compiled = compile_template("(2, sub, 2, obj)", b.tokenizer, "causal")
    torch.manual_seed(0)
    config = TrainConfig(lr=0.1, batch_size=4, epochs=10, min_steps=0, eval_every=2, patience=100, seed=1)
    fitted = fit(b, FitTask(compiled, train, train, oc, config, get_method("ptuning"), None, P19))
    method, result = fitted.prompt, fitted.result
    assert result.best_step > 0 and result.best_dev["p1"] == 100.0  # dev rose from below 100 at step 0
    assert evaluate_facts(b, method, compiled, train, oc).ranks == [1] * len(train)
    assert all(not p.requires_grad and p.grad is None for p in b.model.parameters())


# ---- candidates ---------------------------------------------------------------------------------------


def test_candidates_files(tmp_path, masked_backend):
    lines = tmp_path / "cands.txt"
    lines.write_text("Paris\n\nRome\n  Florence  \n", encoding="utf-8")
    assert read_candidates_file(lines) == (["Paris", "Rome", "Florence"], {})
    records = tmp_path / "cands.jsonl"
    records.write_text('{"relation": "P19", "object": "Paris"}\n{"relation": "P36", "object": "Rome"}\n', encoding="utf-8")
    assert read_candidates_file(records) == ([], {"P19": ["Paris"], "P36": ["Rome"]})
    root = make_fake_lama(tmp_path / "lama")
    data = LamaData(root)
    per = RelationCandidates(masked_backend.tokenizer, data, ObjectsSpec(str(records)))
    assert per.for_relation("P19").words == ["Paris"]
    with pytest.raises(ProbeError, match="has no candidates for relation P37"):
        per.for_relation("P37")
    typed = RelationCandidates(masked_backend.tokenizer, data, ObjectsSpec())
    assert typed.for_relation("P19").words == ["Florence", "Besancon", "Paris"]  # the relation's objects, in order


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ('{"relation": "P19"}\n', ":1: expected a JSON object with non-empty string fields 'relation' and 'object'"),
    ('{"relation": "P19", "object": "Paris"}\n{oops\n', ":2: malformed JSON line"),
])
def test_bad_candidates_files(tmp_path, content, message):
    path = tmp_path / "c.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ProbeError, match=message):
        read_candidates_file(path)
    with pytest.raises(ProbeError, match="is a folder: expected a file of one object a line"):
        read_candidates_file(tmp_path)  # a folder
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ProbeError, match=r"is not UTF-8 text \(a binary file\?\)"):
        read_candidates_file(tmp_path / "bin.txt")


def test_a_candidate_that_tokenises_to_nothing(masked_backend):
    with pytest.raises(ProbeError, match="candidates: candidate .* tokenises to nothing"):
        object_candidates(masked_backend.tokenizer, ["Paris", "\u200b"])


# ---- the command line ---------------------------------------------------------------------------------

ANY_FACTS = {"P19": [("Dante", "Florence"), ("Victor Hugo", "Besancon"), ("Tolstoy", "Yasnaya Polyana"),
                     ("Borges", "Buenos Aires")],
             "P36": [("France", "Paris"), ("Italy", "Rome"), ("Russia", "Moscow")]}


def test_eval_objects_any_end_to_end(tmp_path, tiny_causal_dir):
    root = make_fake_lama(tmp_path / "lama", facts=ANY_FACTS)
    out = tmp_path / "run"
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "--all", "--data", root, "--objects", "any", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "by the gold object's token count" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["objects"] == "any" and cfg["candidates"] == "relation objects" and cfg["length_norm"] is False
    assert cfg["candidates_per_relation"] == {"P19": 4, "P36": 3}
    rows = {r["relation"]: r for r in results["relations"]}
    assert rows["P19"]["n_facts"] == 4 and rows["P19"]["n_dropped"] == 0  # every fact kept
    preds = [json.loads(line) for line in (out / "P19" / "predictions.jsonl").read_text().splitlines()]
    tokens = {p["obj"]: p["n_tokens"] for p in preds}
    assert tokens["Yasnaya Polyana"] >= 3 and tokens["Buenos Aires"] >= 2
    pooled = results["by_length"]
    assert sum(b["facts"] for b in pooled.values()) == 7
    assert set(pooled) <= {"1", "2", "3+"}
    # a single-token run and an any run are not compared unless asked
    single = tmp_path / "single"
    proc = cli_in_process("eval", "--model", tiny_causal_dir, "--all", "--data", root, "--vocab", "objects", "--out", single)
    assert proc.returncode == 0, proc.stderr
    assert_user_error(cli_in_process("compare", single, out), "objects 'single' in", "'any' in", "--allow-mixed",
                      only_line=False)
    proc = cli_in_process("compare", single, out, "--allow-mixed", "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    assert "manual+any" in proc.stdout


def test_train_objects_any_records_the_protocol(tmp_path, tiny_causal_dir):
    root = make_fake_lama(tmp_path / "lama", facts=ANY_FACTS)
    out = tmp_path / "run"
    cands = tmp_path / "cands.txt"
    cands.write_text("Florence\nBesancon\nYasnaya Polyana\nBuenos Aires\nParis\nRome\n", encoding="utf-8")
    proc = cli_in_process("train", "--model", tiny_causal_dir, "--all", "--data", root, "--objects", "any", "--candidates",
                   cands, "--length-norm", "--min-steps", "2", "--eval-every", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["candidates"] == str(cands.resolve()) and cfg["length_norm"] is True
    rows = {r["relation"]: r for r in results["relations"]}
    assert rows["P36"]["n_dropped"] == 1 and rows["P36"]["dropped_reason"] == (
        "objects that are not among the relation's candidates")  # Moscow is not in the file
    assert "by_length" in results and "by_length_manual" in results
    # a saved prompt re-evaluates under the same protocol
    proc = cli_in_process("eval", "--prompts", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--objects", "many"], "--objects 'many': expected single"),
    (["--candidates", "x.txt"], "--candidates and --length-norm apply to --objects any"),
    (["--length-norm"], "--candidates and --length-norm apply to --objects any"),
    (["--objects", "any", "--vocab", "common"], "--vocab applies to --objects single"),
])
def test_objects_flag_errors(tmp_path, fake_lama, args, fragment):
    proc = cli_in_process("eval", "--relation", "P19", "--data", fake_lama, "--out", tmp_path / "run", *args)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "run").exists()


def test_candidates_file_errors_on_the_command_line(tmp_path, fake_lama, tiny_masked_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = cli_in_process("eval", "-r", "P19", "--data", fake_lama, "--objects", "any", "--candidates", empty)
    assert_user_error(proc, f"candidates file {empty} is empty")
    nothing = tmp_path / "nothing.txt"
    nothing.write_text("Paris\n\u200b\n", encoding="utf-8")
    proc = cli_in_process("eval", "--model", tiny_masked_dir, "-r", "P19", "--data", fake_lama, "--objects", "any",
                   "--candidates", nothing, "--out", tmp_path / "run")
    assert_user_error(proc, "tokenises to nothing")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_gold_loss_with_one_prompt_per_row(kind, causal_backend, masked_backend):
    """AutoPrompt's search scores one trigger set per row: the loss of each row is the one of its own prompt."""
    from probe.backends import PromptInputs

    b = causal_backend if kind == "causal" else masked_backend
    oc = object_candidates(b.tokenizer, CITIES if kind == "causal" else ["Paris", "Parisville", "Lyonvilleton", "Florence"])
    facts = [Fact("Dante", "Florence"), Fact("Victor Hugo", "Paris")]
    if kind == "masked":
        facts[0] = Fact("Dante", "Lyonvilleton")
    compiled = compile_template("(2, sub, obj)" if kind == "causal" else "(2, sub, obj, 1)", b.tokenizer, kind)
    batch = collate(compiled, facts, oc, b.pad_id)
    torch.manual_seed(2)
    n = compiled.n_virtual
    a, c = torch.randn(n, b.hidden_size) * 0.05, torch.randn(n, b.hidden_size) * 0.05
    with torch.no_grad():
        per_row = b.gold_loss(batch, PromptInputs(torch.stack([a, c])), oc)
        alone = [b.gold_loss(batch, PromptInputs(v), oc)[i].item() for i, v in enumerate((a, c))]
    assert per_row.tolist() == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("which", ["tiny_masked_dir", "tiny_causal_dir"])
def test_cloze_sentences_with_objects_of_any_length(request, which, tmp_path):
    """--from-sentences goes with --objects any: each fact's own sentence, its [MASK] the object's place."""
    from pathlib import Path

    facts = Path(__file__).parent / "fixtures" / "google_re" / "place_of_birth_test.jsonl"
    out = tmp_path / "run"
    proc = cli_in_process("eval", "--facts", facts, "--from-sentences", "--objects", "any", "--model",
                   request.getfixturevalue(which), "--out", out)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["from_sentences"] is True and results["config"]["objects"] == "any"
    assert results["summary"]["all"]["facts"] == 4 and "by_length" in results
