"""SmolLM2-135M on the real LAMA P19 files, through the command line as a user runs it (about a minute on CPU)."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest
from conftest import run_cli

from probe.batching import filter_facts
from probe.data import LamaData
from probe.vocab import build_candidates

pytestmark = pytest.mark.integration

# What is exact on every CPU is pinned; what a CPU's float32 kernels decide is compared against a second run on the
# same machine instead (a seeded run repeats itself to the digit there; another CPU sums in another order: on an AMD
# EPYC without AMX the P-tuning test's MRR was 0.0199510 against 0.0199604 here, see BENCHMARKS.md).
# SmolLM2-135M's manual prompt on P19 test_34k in float32: facts ranked first, facts in the top 10, MRR (the same on
# the CPUs measured, and with oneDNN and ATen held to AVX2)
P19_TOP1, P19_TOP10, P19_MRR = 60, 240, 0.156605


def test_smollm2_common_vocab_invariant(lama_dir, bpe_tokenizer):
    """Exactly 16,342 of the 21,018 common-vocab words are one token (with a leading space) for SmolLM2."""
    data = LamaData(lama_dir)
    words = data.vocab_words("common")
    cands = build_candidates(bpe_tokenizer, words)
    assert (len(cands), cands.n_source) == (16342, 21018)
    assert len(set(cands.token_ids.tolist())) == 16342
    kept, dropped = filter_facts(data.facts("P19"), cands)
    assert (len(kept), dropped) == (758, 186)


def _eval_p19(out, lama_dir, *args: str):
    proc = run_cli("eval", "--method", "manual", "--model", "smollm2", "--relation", "P19", "--out", out,
                   "--data", lama_dir, *args, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.fixture(scope="module")
def p19_run(tmp_path_factory, lama_dir, smollm2_dir):
    """The manual prompt on P19 with the CLI's defaults (bfloat16)."""
    return _eval_p19(tmp_path_factory.mktemp("integration") / "run", lama_dir)


@pytest.fixture(scope="module")
def p19_float32_run(tmp_path_factory, lama_dir, smollm2_dir):
    """The same in float32, whose figures are pinned."""
    return _eval_p19(tmp_path_factory.mktemp("integration") / "run-f32", lama_dir, "--dtype", "float32")


def _p19_row_and_preds(out) -> tuple[dict, list[dict]]:
    """P19's row of results.json, checked against its saved predictions, and those predictions."""
    results = json.loads((out / "results.json").read_text())
    (row,) = results["relations"]
    assert row["relation"] == "P19" and row["type"] == "N-1" and row["template"] == "[X] was born in [Y] ."
    assert row["n_facts"] == 758
    assert row["n_dropped"] == 186
    preds = [json.loads(x) for x in (out / "P19" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 758
    ranks = [p["rank"] for p in preds]
    assert row["p1"] == pytest.approx(100 * sum(r == 1 for r in ranks) / 758, rel=1e-6)
    assert row["p10"] == pytest.approx(100 * sum(r <= 10 for r in ranks) / 758, rel=1e-6)
    assert row["mrr"] == pytest.approx(sum(1 / r for r in ranks) / 758, rel=1e-6)
    assert all((p["rank"] == 1) == (p["top10"][0] == p["obj"]) for p in preds)
    assert all(len(p["top10"]) == 10 for p in preds)
    s = results["summary"]
    assert list(s) == ["all", "N-1"]
    assert s["all"]["macro_p1"] == s["all"]["micro_p1"] == pytest.approx(row["p1"])
    return row, preds


def test_p19_run_config(p19_run, lama_dir):
    out, proc = p19_run
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert cfg["model"] == "smollm2"
    assert cfg["model_kind"] == "causal"
    assert cfg["method"] == "manual"
    assert cfg["split"] == "test_34k"
    assert cfg["vocab"] == "common"
    assert cfg["n_candidates"] == 16342
    assert cfg["n_vocab_words"] == 21018
    assert cfg["dtype"] == "bfloat16"  # the CLI default
    assert cfg["data"] == str(lama_dir.resolve())
    assert json.loads((out / "config.json").read_text()) == cfg
    assert "16,342 of 21,018 common vocab words are single tokens" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_p19_facts_and_scores(p19_run, p19_float32_run):
    """With the default bfloat16 the figures are those of the saved ranks; which facts come first depends on the
    CPU's bfloat16 kernels, but differs from float32 by a handful of the 758 (3 to 4 on the CPUs measured)."""
    first = [{(p["sub"], p["obj"]) for p in _p19_row_and_preds(run[0])[1] if p["rank"] == 1}
             for run in (p19_run, p19_float32_run)]
    assert len(first[0] ^ first[1]) <= 8


def test_p19_float32_figures_are_pinned(p19_float32_run):
    """In float32 the eval is deterministic: the pinned ranks, so P@1 7.92, P@10 31.66, MRR 0.157."""
    out, _ = p19_float32_run
    row, preds = _p19_row_and_preds(out)
    ranks = [p["rank"] for p in preds]
    assert json.loads((out / "results.json").read_text())["config"]["dtype"] == "float32"
    assert (sum(r == 1 for r in ranks), sum(r <= 10 for r in ranks)) == (P19_TOP1, P19_TOP10)
    assert row["p1"] == pytest.approx(100 * P19_TOP1 / 758, rel=1e-6)
    assert row["p10"] == pytest.approx(100 * P19_TOP10 / 758, rel=1e-6)
    assert row["mrr"] == pytest.approx(P19_MRR, abs=1e-6)


def test_p19_results_json_matches_relations_csv(p19_run):
    out, proc = p19_run
    results = json.loads((out / "results.json").read_text())
    csv = pd.read_csv(out / "relations.csv")
    assert len(csv) == 1
    row = results["relations"][0]
    for col in ("relation", "label", "type", "n_facts", "n_dropped"):
        assert csv[col].iloc[0] == row[col], col
    for col in ("p1", "p10", "mrr"):
        assert csv[col].iloc[0] == pytest.approx(row[col], rel=1e-12), col
    printed = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["P19"])
    assert printed.split()[-3] == f"{row['p1']:.2f}"
    assert (out / "summary.md").read_text().startswith("# manual on smollm2 (test_34k, vocab common)")


def test_smollm2_29k_vocab(lama_dir, bpe_tokenizer):
    """--vocab 29k: P-tuning's shared list (18,154 words), of which 15,683 are single SmolLM2 tokens."""
    cands = build_candidates(bpe_tokenizer, LamaData(lama_dir).vocab_words("29k"))
    assert (len(cands), cands.n_source) == (15683, 18154)


def test_gguf_path_is_the_alias(smollm2_dir):
    """A .gguf path loads as a causal LM from the same cached conversion as the `smollm2` alias."""
    from probe.backends import load_backend, resolve_model, smollm2_gguf

    path = str(smollm2_gguf())
    assert resolve_model(path) == resolve_model("smollm2") == str(smollm2_dir)
    backend = load_backend(path)
    assert backend.kind == "causal" and backend.hidden_size == 576


def _train_p1376(out, lama_dir):
    proc = run_cli("train", "--model", "smollm2", "--relation", "P1376", "--max-train", "48", "--epochs", "1", "--min-steps", "0",
                   "--eval-every", "1", "--dtype", "float32", "--out", out, "--data", lama_dir, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "P1376" / "metrics.json").read_text()), json.loads((out / "P1376" / "config.json").read_text())


def test_train_then_reload_reproduces_on_smollm2(tmp_path, lama_dir, smollm2_dir):
    """A short P-tuning run on the real P1376 files: its figures are those of its ranks, its kept prompt is the best on
    dev, a second run repeats it to the digit, and the saved prompt re-evaluates exactly."""
    out = tmp_path / "run"
    metrics, cfg = _train_p1376(out, lama_dir)
    assert metrics["n_facts"] == 193
    preds = [json.loads(x) for x in (out / "P1376" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 193
    assert metrics["p1"] == pytest.approx(100 * sum(p["rank"] == 1 for p in preds) / 193, rel=1e-6)
    assert metrics["mrr"] == pytest.approx(sum(1 / p["rank"] for p in preds) / 193, rel=1e-6)
    assert metrics["manual_p1"] == pytest.approx(100 * 41 / 193, rel=1e-6)  # 21.24, as `probe eval` in float32
    # each attempt keeps its best dev check by (P@1, MRR), step 0 included (an attempt whose dev P@1 never rose keeps
    # step 0 and has failed); the run keeps the attempt best on dev among those that rose (the last on a tie). Which
    # attempt that is, and its figures, depend on the CPU's float32 kernels (BENCHMARKS.md, "The test suite, on this
    # machine's kernels and on two others"): what is exact everywhere is this selection and the rerun below.
    log = [json.loads(x) for x in (out / "P1376" / "train_log.jsonl").read_text().splitlines()]
    starts = [i for i, e in enumerate(log) if "config" in e] + [len(log)]  # each attempt's log opens with its config
    attempts = [log[a:b] for a, b in itertools.pairwise(starts)]
    assert len(attempts) == len(cfg["attempts"])
    assert [a["lr"] for a in cfg["attempts"]] == [1e-3, 1e-4][: len(attempts)]
    best = []
    for seg, recorded in zip(attempts, cfg["attempts"], strict=True):
        checks = {e["step"]: (e["dev_p1"], e["dev_mrr"]) for e in seg if "dev_p1" in e}
        assert list(checks) == [0, 1, 2, 3] and recorded["steps"] == 3  # 48 facts, batches of 16, one epoch
        step = max(checks, key=checks.get)
        step = step if checks[step][0] > checks[0][0] else 0  # dev P@1 never rose: a failed attempt, best step 0
        assert recorded["best_step"] == step and recorded["dev_p1"] == checks[step][0]
        if step:
            best.append((checks[step], len(best), step))
    assert cfg["steps"] == 3
    if not metrics["fit_failed"]:
        key, _, step = max(best)
        assert cfg["best_step"] == step > 0 and (metrics["dev_p1"], metrics["dev_mrr"]) == key
    assert cfg["template"] == "(3, sub, 3, obj)" and cfg["n_virtual"] == 6 and cfg["hidden_size"] == 576
    # seeded training in float32 repeats itself on this machine: the same figures, the same prompt, byte for byte
    again, again_cfg = _train_p1376(tmp_path / "again", lama_dir)
    assert again == metrics and again_cfg["attempts"] == cfg["attempts"] and again_cfg["best_step"] == cfg["best_step"]
    assert (tmp_path / "again" / "P1376" / "prompt.safetensors").read_bytes() == \
        (out / "P1376" / "prompt.safetensors").read_bytes()
    proc = run_cli("eval", "--prompts", out, "--data", lama_dir, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 of 1 relations reproduce the saved test figures exactly" in proc.stdout


def test_objects_any_on_smollm2_p19(lama_dir):
    """--objects any on SmolLM2 and real P19 facts: every fact kept, the scores of a forward per candidate, and
    the exact ranks of the single-token path on one-token objects with the single-token candidates."""
    import torch

    from probe.backends import load_backend
    from probe.batching import collate
    from probe.evaluator import evaluate_facts
    from probe.methods.manual import ManualPrompt
    from probe.objects import ObjectsSpec, RelationCandidates, object_candidates
    from probe.templates import compile_template

    backend = load_backend("smollm2", dtype="float32")  # bfloat16 logits alone differ by tenths of a nat
    data = LamaData(lama_dir)
    relation = data.relation("P19")
    per = RelationCandidates(backend.tokenizer, data, ObjectsSpec()).for_relation("P19")
    assert len(per) == 474 and filter_facts(data.facts("P19"), per) == (data.facts("P19"), 0)
    compiled = compile_template(relation.template, backend.tokenizer, "causal")
    facts = [f for f in data.facts("P19") if len(per.sequences[per.index[f.obj]]) >= 3][:2]
    batch = collate(compiled, facts, per, backend.pad_id)
    with torch.no_grad():
        (scores,) = backend.score([batch], ManualPrompt(0, backend.hidden_size).prompt_inputs(), per)
        for i, fact in enumerate(batch.facts):
            enc = compiled.encode_fact(fact)
            seq = per.sequences[per.index[fact.obj]]
            ids = torch.tensor([enc.input_ids[: enc.target + 1] + list(seq)])
            logp = backend.model(input_ids=ids).logits[0].float().log_softmax(-1)
            want = sum(float(logp[enc.target + k, t]) for k, t in enumerate(seq))
            assert scores[i, per.index[fact.obj]].item() == pytest.approx(want, abs=1e-3)
    single = build_candidates(backend.tokenizer, data.vocab_words("common"))
    kept, _ = filter_facts(data.facts("P19"), single)
    manual = ManualPrompt(0, backend.hidden_size)
    one = evaluate_facts(backend, manual, compiled, kept[:128], single)
    other = evaluate_facts(backend, manual, compiled, kept[:128], object_candidates(backend.tokenizer, single.words))
    assert other.ranks == one.ranks


def test_a_relations_figures_do_not_depend_on_the_relations_before_it(tmp_path, lama_dir, smollm2_dir):
    """Inputs' first tokens are run once and kept across relations; P279's figures are the same alone and after
    P361 (whose subjects share first tokens with P279's), in the default bfloat16, to the last digit."""
    seen = []  # (ranks of P279's facts, its MRR) per run
    for name, relations in (("alone", ["P279"]), ("after", ["P361", "P279"])):
        args = [a for r in relations for a in ("--relation", r)]
        proc = run_cli("eval", "--method", "manual", "--model", "smollm2", *args, "--out", tmp_path / name,
                       "--data", lama_dir, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        preds = [json.loads(x) for x in (tmp_path / name / "P279" / "predictions.jsonl").read_text().splitlines()]
        metrics = json.loads((tmp_path / name / "P279" / "metrics.json").read_text())
        seen.append(([(p["sub"], p["obj"], p["rank"]) for p in preds], metrics["mrr"]))
    assert len(seen[0][0]) == 924 and seen[0] == seen[1]
