"""ParaRel consistency: probe's figures against a transcription of ParaRel's own analysis (yanaiela/pararel,
pararel/consistency/encode_consistency_probe.py: analyze_results, evaluate_lama, group_score_lama_eval,
group_score_incorrect_ans_eval), written here from reading that code, on fixed and random tables of predictions;
then `probe eval --consistency` end to end on the tiny models, and on SmolLM2 (integration)."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import networkx as nx
import pytest
import torch

from probe.consistency import Edge, a_an_mismatch, consistency_metrics, macro, prompt_metrics, read_graph
from probe.data import Fact
from tests.conftest import assert_user_error, cli_in_process, make_fake_lama, write_jsonl

# ---------------------------------------------------------------------------------------------
# ParaRel's analysis, transcribed: a networkx DiGraph whose nodes carry `lm_pattern` and whose edges carry an
# `edge_type` with syntactic_change / lexical_change / determiner_change, as ParaRel's pickled graphs do; results as
# its parse_lm_results makes them (pattern -> subject -> (top-1 answer, gold)), and its row-wise LAMA/group scores
# over (data, predictions) lists. Its wandb summary is a dict here. Left out: the entropy and the
# avg_consistency_by_edge_out figures, which probe does not report.
# ---------------------------------------------------------------------------------------------


class _Node:
    def __init__(self, pattern: str):
        self.lm_pattern = pattern


def pararel_graph(patterns: list[str], edges: list[Edge]) -> nx.DiGraph:
    graph = nx.DiGraph()
    nodes = {p: _Node(p) for p in patterns}
    for p in patterns:
        graph.add_node(nodes[p])
    for e in edges:
        kind = SimpleNamespace(syntactic_change=e.syntactic, lexical_change=e.lexical, determiner_change=e.determiner)
        graph.add_edge(nodes[e.source], nodes[e.target], edge_type=kind)
    return graph


def pararel_vowel_filter(pattern, gold_object):
    words = pattern.split(' ')
    indices = [ind for (ind, x) in enumerate(words) if '[Y]' in x]
    assert len(indices) == 1
    y_index = indices[0]
    if y_index == 0:
        return False
    vowels = ['a', 'e', 'i', 'o', 'u']
    if words[y_index - 1] == 'a' and any([gold_object.lower().startswith(x) for x in vowels]):
        return True
    if words[y_index - 1] == 'an' and not any([gold_object.lower().startswith(x) for x in vowels]):
        return True
    return False


def pararel_analyze(lm_results: dict, graph) -> dict:
    """ParaRel's analyze_results, its counters and branches as written there."""
    summary = {}
    total = points = 0
    totals = dict(syn=0, lex=0, both=0, no=0)
    points_k = dict(syn=0, lex=0, both=0, no=0)
    consistent_subjects = defaultdict(list)
    correct_subjects_per_pattern = defaultdict(int)
    correct_patterns_per_subject = defaultdict(int)
    consistency_performance = defaultdict(list)

    def node_of(pattern):
        for node in graph.nodes:
            if node.lm_pattern == pattern:
                return node
        return None

    for pattern, vals in lm_results.items():
        for subj, (pred, gold_obj) in vals.items():
            graph_node = node_of(pattern)
            if graph_node is None:
                continue
            if pararel_vowel_filter(pattern, gold_obj):
                continue
            correct_patterns_per_subject[subj] += int(pred == gold_obj)
            correct_subjects_per_pattern[pattern] += int(pred == gold_obj)
            consistent_subjects[subj].append(pred)
            for ent_node in graph.successors(graph_node):
                if [graph_node, ent_node] not in graph.edges:
                    continue
                et = graph.edges[graph_node, ent_node]['edge_type']
                ent_pattern = ent_node.lm_pattern
                if pararel_vowel_filter(ent_pattern, gold_obj):
                    continue
                success = pred == lm_results[ent_pattern][subj][0]
                points += success
                total += 1
                consistency_performance[subj].append(success)
                if et.syntactic_change and not et.lexical_change and not et.determiner_change:
                    points_k['syn'] += success
                    totals['syn'] += 1
                elif et.lexical_change and not et.syntactic_change and not et.determiner_change:
                    points_k['lex'] += success
                    totals['lex'] += 1
                elif et.lexical_change and et.syntactic_change and not et.determiner_change:
                    points_k['both'] += success
                    totals['both'] += 1
                if not et.syntactic_change and not et.lexical_change and not et.determiner_change:
                    points_k['no'] += success
                    totals['no'] += 1
    summary['consistency'] = points / total if total > 0 else -1
    for k, name in (('syn', 'syntactic'), ('lex', 'lexical'), ('no', 'no_change'), ('both', 'both')):
        summary[f'{name}_consistency'] = points_k[k] / totals[k] if totals[k] > 0 else -1
    all_consistent = sum(1 for preds in consistent_subjects.values() if len(set(preds)) == 1)
    summary['consistent_subjects'] = all_consistent / len(consistent_subjects)
    ks = kt = us = ut = 0
    for subj, success in consistency_performance.items():
        if correct_patterns_per_subject[subj] > 0:
            ks += sum(success)
            kt += len(success)
        else:
            us += sum(success)
            ut += len(success)
    summary['knowledgable_consistency'] = ks / kt if kt > 0 else 0
    summary['unknowledgable_consistency'] = us / ut if ut > 0 else 0
    summary['total'] = total
    summary['total_syn'], summary['total_lex'] = totals['syn'], totals['lex']
    summary['total_both'], summary['total_no'] = totals['both'], totals['no']
    return summary


def pararel_lama_scores(results_dict: dict, prompts: list[str]) -> dict:
    """ParaRel's evaluate_lama (first pattern), group_score_lama_eval and group_score_incorrect_ans_eval, over the
    fact rows (`data`) and each row's ranked predictions."""
    data = results_dict[prompts[0]]['data']
    lama = sum(results_dict[prompts[0]]['predictions'][i][0]['token_str'] == d['obj_label']
               for i, d in enumerate(data)) / len(data)
    group = unacc = 0
    for i, d in enumerate(data):
        if all(results_dict[p]['predictions'][i][0]['token_str'] == d['obj_label'] for p in prompts):
            group += 1
        answers = defaultdict(int)
        for p in prompts:
            answers[results_dict[p]['predictions'][i][0]['token_str']] += 1
        if len(answers) == 1 and list(answers.keys())[0] != d['obj_label']:
            unacc += 1
    return {'lama_acc': lama, 'lama_group_acc': group / len(data), 'group-unacc': unacc / len(data)}


def pararel_figures(patterns, edges, rows, top1) -> dict:
    """ParaRel's figures for a table of top-1 answers: results_dict as run_query leaves it, then its analysis."""
    results_dict = {p: {'data': [{'sub_label': f.sub, 'obj_label': f.obj} for f in rows],
                        'predictions': [[{'token_str': top1[p][f.sub]}] for f in rows]} for p in patterns}
    lm_results = defaultdict(dict)  # parse_lm_results: keyed by subject, the last row wins
    for p, dic in results_dict.items():
        for d, preds in zip(dic['data'], dic['predictions'], strict=True):
            lm_results[p][d['sub_label']] = (preds[0]['token_str'], d['obj_label'])
    return {**pararel_analyze(lm_results, pararel_graph(patterns, edges)), **pararel_lama_scores(results_dict, patterns)}


def assert_matches_pararel(mine: dict, theirs: dict) -> None:
    def pct(v, undefined):
        return None if v == undefined else pytest.approx(100 * v)

    assert mine["consistency"] == pct(theirs["consistency"], -1)
    for k in ("syntactic", "lexical", "both", "no_change"):
        assert mine[f"{k.replace('no_change', 'none')}_consistency"] == pct(theirs[f"{k}_consistency"], -1), k
    assert mine["n_pairs"] == theirs["total"]
    assert (mine["n_syntactic_pairs"], mine["n_lexical_pairs"], mine["n_both_pairs"], mine["n_none_pairs"]) == (
        theirs["total_syn"], theirs["total_lex"], theirs["total_both"], theirs["total_no"])
    assert mine["consistent_subjects"] == pytest.approx(100 * theirs["consistent_subjects"])
    # ParaRel writes 0 where no pair counts; probe None
    assert (mine["knowledgeable_consistency"] or 0) == pytest.approx(100 * theirs["knowledgable_consistency"])
    assert (mine["unknowledgeable_consistency"] or 0) == pytest.approx(100 * theirs["unknowledgable_consistency"])
    assert mine["lama_acc"] == pytest.approx(100 * theirs["lama_acc"])
    assert mine["group_acc"] == pytest.approx(100 * theirs["lama_group_acc"])
    assert mine["group_unacc"] == pytest.approx(100 * theirs["group-unacc"])


# A fixed table: "a [Y]" / "an [Y]" patterns (filtered for golds that start with / without a vowel), every kind of
# edge (a determiner change too), a subject on two rows with two golds (the last one counts per subject), a
# repeated row, and answers that agree, disagree, and are right or wrong.
PATTERNS = ["[X] works as a [Y].", "[X] is a [Y] by profession.", "[X] works as an [Y].", "[X]'s job is [Y].",
            "The job of [X] is [Y]."]
EDGES = [Edge(a, b, s, lx, d) for a, b, s, lx, d in [
    (PATTERNS[0], PATTERNS[1], True, True, False), (PATTERNS[1], PATTERNS[0], True, True, False),
    (PATTERNS[0], PATTERNS[2], False, False, True), (PATTERNS[2], PATTERNS[0], False, False, True),
    (PATTERNS[0], PATTERNS[3], False, True, False), (PATTERNS[3], PATTERNS[0], False, True, False),
    (PATTERNS[3], PATTERNS[4], True, False, False), (PATTERNS[4], PATTERNS[3], True, False, False),
    (PATTERNS[1], PATTERNS[4], False, False, False), (PATTERNS[2], PATTERNS[4], True, True, False),
]]
ROWS = [Fact("Ann", "actor"), Fact("Bob", "painter"), Fact("Cyd", "engineer"), Fact("Dee", "poet"),
        Fact("Eve", "actor"), Fact("Dee", "author"), Fact("Bob", "painter"), Fact("Fay", "umpire")]
TOP1 = {
    PATTERNS[0]: {"Ann": "painter", "Bob": "painter", "Cyd": "engineer", "Dee": "poet", "Eve": "actor", "Fay": "poet"},
    PATTERNS[1]: {"Ann": "actor", "Bob": "painter", "Cyd": "poet", "Dee": "author", "Eve": "actor", "Fay": "poet"},
    PATTERNS[2]: {"Ann": "actor", "Bob": "actor", "Cyd": "engineer", "Dee": "author", "Eve": "actor", "Fay": "author"},
    PATTERNS[3]: {"Ann": "actor", "Bob": "painter", "Cyd": "engineer", "Dee": "poet", "Eve": "actor", "Fay": "poet"},
    PATTERNS[4]: {"Ann": "actor", "Bob": "poet", "Cyd": "engineer", "Dee": "author", "Eve": "actor", "Fay": "poet"},
}


def test_a_an_filter_as_pararel():
    for p in PATTERNS + ["[Y] is where [X] was born.", "[X] plays an[Y].", "[X] is a a [Y] ."]:
        for gold in ("actor", "painter", "Umpire", "Engineer", "yak"):
            assert a_an_mismatch(p, gold) == pararel_vowel_filter(p, gold), (p, gold)
    assert a_an_mismatch(PATTERNS[0], "actor") and a_an_mismatch(PATTERNS[2], "poet")
    assert not a_an_mismatch(PATTERNS[0], "poet") and not a_an_mismatch(PATTERNS[2], "Umpire")


def test_fixed_table_matches_pararel():
    mine = consistency_metrics(PATTERNS, EDGES, ROWS, TOP1)
    theirs = pararel_figures(PATTERNS, EDGES, ROWS, TOP1)
    assert_matches_pararel(mine, theirs)
    # the filter is at work: "a [Y]" drops actor/engineer/umpire golds, "an [Y]" drops painter/poet/author golds
    assert mine["n_pairs"] == theirs["total"] == 22 < len(EDGES) * 6
    assert mine["n_subjects"] == 6 and mine["n_rows"] == 8 and mine["n_edges"] == 10
    assert mine["unknowledgeable_consistency"] is not None and mine["none_consistency"] is not None
    assert mine["lama_acc"] == pytest.approx(100 * 5 / 8)  # rows, not subjects: Dee's two rows, Bob's twice
    assert mine["group_acc"] == pytest.approx(100 * 1 / 8)  # Eve alone: every pattern says actor


@pytest.mark.parametrize("seed", range(12))
def test_random_tables_match_pararel(seed):
    rng = random.Random(seed)
    answers = ["actor", "painter", "engineer", "umpire", "author", "Oboe"]
    subjects = [f"S{i}" for i in range(rng.randint(3, 14))]
    rows = [Fact(rng.choice(subjects), rng.choice(answers)) for _ in range(rng.randint(len(subjects), 30))]
    patterns = rng.sample(PATTERNS, rng.randint(2, len(PATTERNS)))
    edges = [Edge(a, b, rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.2)
             for a in patterns for b in patterns if a != b and rng.random() < 0.8]
    if not edges:
        edges = [Edge(patterns[0], patterns[1], True, False, False)]
    skew = rng.random()  # some tables mostly agree, others mostly do not
    top1 = {}
    for p in patterns:
        top1[p] = {f.sub: (f.obj if rng.random() < skew else rng.choice(answers)) for f in rows}
    assert_matches_pararel(consistency_metrics(patterns, edges, rows, top1), pararel_figures(patterns, edges, rows, top1))


def test_prompt_node_figures():
    prompt = {"Ann": "actor", "Bob": "painter", "Cyd": "engineer", "Dee": "poet", "Eve": "painter", "Fay": "umpire"}
    got = prompt_metrics(PATTERNS, ROWS, TOP1, prompt)
    # Eve: all five patterns say actor (consistent); Ann: the majority says actor (inconsistent), and so on
    gold = {"Ann": "actor", "Bob": "painter", "Cyd": "engineer", "Dee": "author", "Eve": "actor", "Fay": "umpire"}
    same = total = 0
    for p in PATTERNS:
        kept = [s for s in gold if not pararel_vowel_filter(p, gold[s])]
        assert got["prompt_agreement_by_pattern"][p] == pytest.approx(
            100 * sum(prompt[s] == TOP1[p][s] for s in kept) / len(kept))
        same, total = same + sum(prompt[s] == TOP1[p][s] for s in kept), total + len(kept)
    assert got["prompt_agreement"] == pytest.approx(100 * same / total)
    assert got["prompt_acc"] == pytest.approx(100 * 6 / 8)  # wrong on Eve and on Dee's last row
    # after the a/an filter, the patterns agree on Ann, Cyd and Eve (the prompt matches Ann's and Cyd's answer) and
    # not on Bob, Dee and Fay (majorities painter, author, poet: the prompt matches Bob's only)
    assert got["n_subjects_consistent"] == 3 and got["n_subjects_inconsistent"] == 3
    assert got["prompt_majority_agreement_consistent"] == pytest.approx(100 * 2 / 3)
    assert got["prompt_majority_agreement_inconsistent"] == pytest.approx(100 * 1 / 3)


def test_macro_skips_undefined():
    rows = [{"consistency": 50.0, "lama_acc": 10.0}, {"consistency": None, "lama_acc": 30.0}]
    out = macro(rows)
    assert out["consistency"] == 50.0 and out["consistency_relations"] == 1
    assert out["lama_acc"] == 20.0 and out["lama_acc_relations"] == 2


def test_shipped_graphs_are_read(lama_dir):
    edges = read_graph(lama_dir / "prompts" / "pararel_graphs" / "P19.jsonl")
    assert len(edges) == 13 * 12 and edges[0].source == "[X] was born in [Y]."
    assert {e.kind for e in edges} <= {"syntactic", "lexical", "both", "none", None}


# ---------------------------------------------------------------------------------------------
# End to end on the tiny models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, request) -> dict:
    """Tiny masked and causal LMs with a wide initialisation, so that their answers differ from subject to subject
    and from pattern to pattern (the shared tiny models give one answer to everything)."""
    from transformers import BertConfig, BertForMaskedLM

    from tests.conftest import save_tiny_llama

    tok = request.getfixturevalue("wordpiece_tokenizer")
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                        initializer_range=0.5)
    torch.manual_seed(1)
    masked = tmp_path_factory.mktemp("wide-bert")
    BertForMaskedLM(config).save_pretrained(masked)
    tok.save_pretrained(masked)
    dirs = {"masked": masked}
    try:
        bpe = request.getfixturevalue("bpe_tokenizer")
    except pytest.skip.Exception:
        return dirs
    dirs["causal"] = save_tiny_llama(tmp_path_factory.mktemp("wide-llama"), bpe, seed=1, initializer_range=0.5)
    return dirs

TINY_PATTERNS = {
    "P36": ["The capital of [X] is [Y] .", "[X] has the capital [Y] .", "[Y] is the capital of [X] .",
            "[X] , whose capital is [Y] ."],
    "P37": ["The official language of [X] is [Y] .", "In [X] , the language is [Y] .", "[X] speaks an [Y] ."],
}


def tiny_pararel(root: Path) -> Path:
    """A fake LAMA folder with ParaRel's layout: prompts/pararel, prompts/pararel_graphs (complete graphs) and
    extras/pararel_trex_lms_vocab (a repeated row kept)."""
    make_fake_lama(root)
    facts = {"P36": [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Italy", "Rome")],
             "P37": [("France", "French"), ("Italy", "Italian"), ("Germany", "German"), ("England", "English")]}
    for rid, pats in TINY_PATTERNS.items():
        write_jsonl(root / "prompts" / "pararel" / f"{rid}.jsonl", [{"pattern": p} for p in pats])
        write_jsonl(root / "prompts" / "pararel_graphs" / f"{rid}.jsonl", [
            {"from": a, "to": b, "syntactic_change": i % 2 == 0, "lexical_change": j % 2 == 1, "determiner_change": False}
            for i, a in enumerate(pats) for j, b in enumerate(pats) if a != b])
        write_jsonl(root / "extras" / "pararel_trex_lms_vocab" / f"{rid}.jsonl",
                    [{"sub_label": s, "obj_label": o} for s, o in facts[rid]])
    return root


def recomputed(run: Path, rid: str, data_root: Path) -> tuple[dict, dict]:
    """A relation's metrics.json, and ParaRel's figures from its predictions.jsonl and ParaRel's facts file."""
    metrics = json.loads((run / rid / "metrics.json").read_text())
    preds = [json.loads(line) for line in (run / rid / "predictions.jsonl").read_text().splitlines()]
    patterns = [p for p in TINY_PATTERNS[rid] if p not in metrics["patterns_skipped"]]
    top1 = {p: {r["sub"]: r["answers"][p] for r in preds} for p in patterns}
    rows = [Fact(r["sub_label"], r["obj_label"]) for r in map(json.loads, (
        data_root / "extras" / "pararel_trex_lms_vocab" / f"{rid}.jsonl").read_text().splitlines())]
    rows = [f for f in rows if f.sub in top1[patterns[0]]]
    edges = [e for e in read_graph(data_root / "prompts" / "pararel_graphs" / f"{rid}.jsonl")
             if e.source in patterns and e.target in patterns]
    return metrics, pararel_figures(patterns, edges, rows, top1)


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_cli_consistency_tiny(tmp_path, kind, tiny_dirs):
    if kind not in tiny_dirs:
        pytest.skip("SmolLM2's tokenizer (for the tiny causal LM) is not here")
    root = tiny_pararel(tmp_path / "lama")
    model = tiny_dirs[kind]
    out = tmp_path / "run"
    proc = cli_in_process("eval", "--consistency", "--model", str(model), "--data", str(root), "--all",
                          "--out", str(out), "--dtype", "float32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "consistency" in proc.stdout and "macro" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["split"] == "pararel" and results["config"]["method"] == "consistency"
    assert (out / "consistency.png").stat().st_size > 0 and (out / "consistency.md").is_file()
    for rid in TINY_PATTERNS:
        metrics, theirs = recomputed(out, rid, root)
        assert metrics["n_rows"] == 4 and metrics["n_facts"] == 4  # the repeated row is kept, as ParaRel counts it
        assert_matches_pararel(metrics, theirs)
    skipped = json.loads((out / "P36" / "metrics.json").read_text())["patterns_skipped"]
    # a causal LM cannot see a subject after [Y]: that pattern is left out (and named), its edges with it
    assert list(skipped) == (["[Y] is the capital of [X] ."] if kind == "causal" else [])
    n = 3 if kind == "causal" else 4
    assert json.loads((out / "P36" / "metrics.json").read_text())["n_edges"] == n * (n - 1)
    assert any(0 < r["consistency"] < 100 for r in results["relations"])  # the answers differ between patterns
    assert results["consistency"]["consistency"] == pytest.approx(
        sum(r["consistency"] for r in results["relations"]) / 2)


def test_cli_consistency_trained_prompt(tmp_path, tiny_dirs):
    tiny_masked_dir = tiny_dirs["masked"]
    root = tiny_pararel(tmp_path / "lama")
    train = tmp_path / "train"
    proc = cli_in_process("train", "--model", str(tiny_masked_dir), "--data", str(root), "-r", "P36", "-r", "P37",
                          "--out", str(train), "--epochs", "1", "--min-steps", "2", "--eval-every", "1",
                          "--dtype", "float32", "--vocab", "objects")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "cons"
    proc = cli_in_process("eval", "--consistency", "--prompts", str(train), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prompt_agreement" in proc.stdout
    for rid in TINY_PATTERNS:
        metrics = json.loads((out / rid / "metrics.json").read_text())
        preds = [json.loads(line) for line in (out / rid / "predictions.jsonl").read_text().splitlines()]
        top1 = {p: {r["sub"]: r["answers"][p] for r in preds} for p in TINY_PATTERNS[rid]}
        rows = [Fact(r["sub"], r["obj"]) for r in preds]
        rows = [*rows, Fact("Italy", "Rome")] if rid == "P36" else rows  # ParaRel's file repeats a row
        expect = prompt_metrics(TINY_PATTERNS[rid], rows, top1, {r["sub"]: r["prompt"] for r in preds})
        assert {k: metrics[k] for k in expect} == expect
        assert metrics["prompt_template"] == json.loads((train / rid / "config.json").read_text())["template"]


def test_consistency_errors(tmp_path, fake_lama):
    assert_user_error(cli_in_process("eval", "--consistency", "--data", str(fake_lama), "-r", "P36"),
                      "--consistency needs --prompts-file")
    root = tiny_pararel(tmp_path / "lama2")
    assert_user_error(cli_in_process("eval", "--consistency", "--data", str(root), "-r", "P36", "--vocab", "common"),
                      "--vocab does not apply to --consistency")
    assert_user_error(cli_in_process("eval", "--consistency", "--data", str(root), "-r", "P36", "--split", "pararel",
                                     "--prompts-file", str(root / "prompts" / "nothing")), "not found")
    assert_user_error(cli_in_process("eval", "--consistency", "--prompts", str(tmp_path / "none")), "does not exist")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# SmolLM2 on two real ParaRel relations
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_pararel_two_relations(tmp_path, lama_dir, smollm2_dir, bpe_tokenizer):
    from probe.vocab import build_candidates

    out = tmp_path / "run"
    proc = cli_in_process("eval", "--consistency", "--data", str(lama_dir), "-r", "P264,P463", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    graphs, facts = lama_dir / "prompts" / "pararel_graphs", lama_dir / "extras" / "pararel_trex_lms_vocab"
    for rid in ("P264", "P463"):
        metrics = json.loads((out / rid / "metrics.json").read_text())
        preds = [json.loads(line) for line in (out / rid / "predictions.jsonl").read_text().splitlines()]
        patterns = [json.loads(line)["pattern"].strip() for line in (lama_dir / "prompts" / "pararel" / f"{rid}.jsonl")
                    .read_text().splitlines()]
        patterns = [p for p in patterns if p not in metrics["patterns_skipped"]]
        top1 = {p: {r["sub"]: r["answers"][p] for r in preds} for p in patterns}
        rows = [Fact(r["sub_label"], r["obj_label"]) for r in map(json.loads, (facts / f"{rid}.jsonl").read_text()
                                                                  .splitlines())]
        single = build_candidates(bpe_tokenizer, list(dict.fromkeys(f.obj for f in rows))).index
        rows = [f for f in rows if f.obj in single]  # objects that are one SmolLM2 token
        assert len(rows) == metrics["n_facts"] and metrics["n_pairs"] > 0
        edges = [e for e in read_graph(graphs / f"{rid}.jsonl") if e.source in patterns and e.target in patterns]
        assert_matches_pararel(metrics, pararel_figures(patterns, edges, rows, top1))
        assert all("[Y]" in p.split("[X]")[0] for p in metrics["patterns_skipped"])  # only [Y]-before-[X] ones


def test_masked_answers_match_pararels_query(tmp_path, tiny_dirs):
    """ParaRel's run_query asks transformers' fill-mask pipeline with the relation's objects as targets; probe's
    answer of every pattern and subject is that pipeline's top-1 on the tiny BERT."""
    from transformers import pipeline

    tiny_masked_dir = tiny_dirs["masked"]
    root = tiny_pararel(tmp_path / "lama")
    out = tmp_path / "run"
    proc = cli_in_process("eval", "--consistency", "--model", str(tiny_masked_dir), "--data", str(root), "--all",
                          "--out", str(out), "--dtype", "float32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fill = pipeline("fill-mask", model=str(tiny_masked_dir), tokenizer=str(tiny_masked_dir), device=-1)
    seen = set()
    for rid, patterns in TINY_PATTERNS.items():
        preds = [json.loads(line) for line in (out / rid / "predictions.jsonl").read_text().splitlines()]
        objects = sorted({r["obj"] for r in preds})
        for p in patterns:
            for r in preds:
                text = p.replace("[X]", r["sub"]).replace("[Y]", fill.tokenizer.mask_token)
                assert fill(text, targets=objects, top_k=len(objects))[0]["token_str"] == r["answers"][p], (p, r)
                seen.add(r["answers"][p])
    assert len(seen) >= 4  # the answers differ: the pipeline's ranking is checked, not one constant
