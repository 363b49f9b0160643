"""The majority-class control and `probe compare`: hand-computed figures on fake LAMA and hand-made run folders."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import assert_user_error, cli_in_process, make_fake_lama, write_jsonl, write_relation
from typer.testing import CliRunner

import cli
from probe.comparison import compare_runs, load_runs, run_label, write_comparison
from probe.controls import CONTROLS, majority_scores
from probe.data import Fact
from probe.errors import ProbeError
from probe.evaluator import evaluate_fixed
from probe.methods import METHODS, get_method
from probe.runs import RunFolder
from probe.vocab import build_candidates

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


# ---- majority-class control -----------------------------------------------------------------

TRAIN_P19 = [("a", "Paris"), ("b", "Florence"), ("c", "Florence"), ("d", "Rome"), ("e", "Paris"), ("f", "Florence"),
             ("g", "Berlin"), ("h", "Besancon")]  # Florence 3, Paris 2, Rome 1 (seen before Berlin 1); Besancon: no candidate
TEST_P19 = [("s1", "Florence"), ("s2", "Paris"), ("s3", "Berlin"), ("s4", "French"), ("s5", "Besancon")]


def test_majority_scores_rank_by_count_then_first_seen(wordpiece_tokenizer):
    cands = build_candidates(wordpiece_tokenizer, ["Paris", "Rome", "Berlin", "Florence", "French"])
    scores = majority_scores([Fact(s, o) for s, o in TRAIN_P19], cands)
    assert scores.shape == (len(cands),)
    order = sorted(cands.words, key=lambda w: -float(scores[cands.index[w]]))
    assert order[:4] == ["Florence", "Paris", "Rome", "Berlin"]
    assert {w: float(scores[cands.index[w]]) for w in cands.words} == {
        "Florence": 4.0, "Paris": 3.0, "Rome": 2.0, "Berlin": 1.0, "French": 0.0}
    # a control, not a prompt method: no method of that name
    assert "majority" in CONTROLS and "majority" not in METHODS
    with pytest.raises(ProbeError, match="unknown method 'majority'"):
        get_method("majority")


def test_evaluate_majority_ranks_every_fact_alike(wordpiece_tokenizer):
    cands = build_candidates(wordpiece_tokenizer, ["Paris", "Rome", "Berlin", "Florence", "French"])
    test = [Fact(s, o) for s, o in TEST_P19 if o != "Besancon"]
    result = evaluate_fixed(majority_scores([Fact(s, o) for s, o in TRAIN_P19], cands), test, cands)
    assert result.ranks == [1, 2, 4, 5]  # Florence, Paris, Berlin; French unseen in train, so after the 4 seen
    assert result.top10 == [["Florence", "Paris", "Rome", "Berlin", "French"]] * 4
    assert result.metrics["p1"] == pytest.approx(25.0) and result.metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 5) / 4)


def test_cli_majority_control_hand_computed(tmp_path, tiny_masked_dir):
    lama = make_fake_lama(tmp_path / "lama")
    write_jsonl(lama / "trex/train/P19.jsonl", [{"sub_label": s, "obj_label": o} for s, o in TRAIN_P19])
    write_jsonl(lama / "trex/test_34k/P19.jsonl", [{"sub_label": s, "obj_label": o} for s, o in TEST_P19])
    out = tmp_path / "majority"
    res = invoke("eval", "--control", "majority", "--all", "--model", tiny_masked_dir, "--data", lama, "--out", out)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["method"] is None and results["config"]["control"] == "majority"
    assert json.loads((out / "config.json").read_text()) == results["config"]
    assert run_label(results["config"]) == "majority"
    p19, p36, p37 = results["relations"]
    # P19 test: Florence rank 1, Paris 2, Berlin 4, French unseen in train: 4 seen objects, so rank 5; Besancon dropped
    assert (p19["n_facts"], p19["n_dropped"], p19["n_train"]) == (4, 1, 7)
    assert p19["p1"] == pytest.approx(25.0) and p19["p10"] == pytest.approx(100.0)
    assert p19["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 5) / 4)
    # P36: train = test, each capital once: first seen first, so France->Paris is right, Rome 2nd, Berlin 3rd
    assert p36["p1"] == pytest.approx(100 / 3) and p36["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert p37["p1"] == pytest.approx(25.0)
    lines = (out / "P19" / "predictions.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["top10"][:4] == ["Florence", "Paris", "Rome", "Berlin"]
    # a second run of the same folder is refused, the finished one left alone
    again = invoke("eval", "--control", "majority", "--all", "--model", tiny_masked_dir, "--data", lama, "--out", out)
    assert isinstance(again.exception, ProbeError) and "already exists" in str(again.exception)


@pytest.mark.parametrize(("args", "fragments"), [
    (["eval", "--method", "majority"], ["use --control majority"]),
    (["eval", "--control", "majority", "--method", "manual"], ["--method does not apply to --control majority"]),
    (["eval", "--control", "majority", "--seed", "3"], ["--seed does not apply to --control majority"]),
    (["train", "--method", "majority"], ["unknown method 'majority'"]),
    (["train", "--control", "majority"], ["--control 'majority' does not apply to `probe train`"]),
])
def test_cli_majority_is_a_control_not_a_method(tmp_path, args, fragments):
    lama = make_fake_lama(tmp_path / "lama")
    proc = cli_in_process(*args, "--relation", "P19", "--data", lama, "--out", tmp_path / "out")
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "out").exists()


# ---- compare --------------------------------------------------------------------------------


def row(rid: str, type_: str, n: int, p1: float, p10: float = 50.0, mrr: float = 0.5, **extra) -> dict:
    return {"relation": rid, "label": f"label {rid}", "type": type_, "n_facts": n, "n_dropped": 0,
            "p1": p1, "p10": p10, "mrr": mrr, **extra}


def train_row(rid: str, type_: str, n: int, p1: float, manual_p1: float) -> dict:
    """A row of a training run: it also carries the manual prompt's test figures."""
    return row(rid, type_, n, p1, manual_p1=manual_p1, manual_p10=50.0, manual_mrr=0.5)


def make_run(folder, method: str | None, rows: list[dict], model: str = "m", **config):
    run = RunFolder(folder, {"command": "eval", "model": model, "method": method, "split": "test_34k",
                             "vocab": "common", **config})
    for r in rows:
        write_relation(run, r["relation"], r)
    run.write_summary()
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    return [
        make_run(root / "a-manual", "manual", [row("P19", "N-1", 10, 20.0, 40.0, 0.3), row("P36", "1-1", 30, 60.0, 80.0, 0.7),
                                                row("P37", "N-M", 10, 10.0)]),
        make_run(root / "b-discrete", "discrete", [row("P19", "N-1", 10, 40.0), row("P36", "1-1", 30, 50.0)],
                 prompts_file="/x/fact_retrieval_bert_prompts.jsonl", ensemble=False),
        make_run(root / "c-ptuning", "ptuning", [train_row("P19", "N-1", 10, 50.0, 25.0),
                                                 train_row("P36", "1-1", 30, 70.0, 45.0),
                                                 train_row("P37", "N-M", 10, 30.0, 10.0)], command="train"),
        make_run(root / "d-majority", None, [row("P19", "N-1", 10, 10.0), row("P36", "1-1", 30, 0.0),
                                             row("P37", "N-M", 10, 5.0)], control="majority"),
    ]


def test_compare_numbers(runs):
    cmp = compare_runs(load_runs(runs))
    assert cmp.relations == ["P19", "P36"]  # P37 is missing from the discrete run
    assert cmp.notes[0] == "macro/micro over the 2 relations present in all 4 runs"
    assert cmp.notes[1:] == [f"left out: P37 (not in {runs[1]})"]
    s = cmp.summary.set_index("label")
    assert list(s.index) == ["manual", "discrete:fact_retrieval_bert_prompts", "ptuning", "majority"]
    assert s["macro_p1"].tolist() == pytest.approx([40.0, 45.0, 60.0, 5.0])
    assert s["micro_p1"].tolist() == pytest.approx([50.0, 47.5, 65.0, 2.5])  # (p1 x n_facts) / 40 facts
    assert s.loc["manual", "macro_p10"] == pytest.approx(60.0) and s.loc["manual", "micro_p10"] == pytest.approx(70.0)
    assert s.loc["manual", "micro_mrr"] == pytest.approx((0.3 * 10 + 0.7 * 30) / 40)
    assert s["p1_1-1"].tolist() == pytest.approx([60.0, 50.0, 70.0, 0.0])
    assert s["p1_N-1"].tolist() == pytest.approx([20.0, 40.0, 50.0, 10.0])
    assert s["p1_N-M"].isna().all()
    # gain over manual: the manual run for the eval runs, the train run's own manual_p1 for the train run
    assert s["manual_p1"].tolist() == pytest.approx([40.0, 40.0, 35.0, 40.0])
    assert s["gain_p1"].tolist() == pytest.approx([0.0, 5.0, 25.0, -35.0])
    assert s["manual_from"].tolist() == ["manual", "manual", "own manual_p1", "manual"]
    assert cmp.per_relation.columns.tolist()[:3] == ["relation", "label", "type"]
    assert cmp.per_relation["ptuning"].tolist() == [50.0, 70.0]


def test_compare_cli_writes_table_and_plots(runs, tmp_path):
    out = tmp_path / "cmp"
    res = invoke("compare", runs[0].parent, "--out", out)  # a folder of run folders
    assert res.exit_code == 0, res.output
    assert "macro/micro over the 2 relations present in all 4 runs" in res.stdout
    assert {p.name for p in out.iterdir()} == {"compare.csv", "compare.md", "types.png", "manual_vs.png"}
    csv = pd.read_csv(out / "compare.csv")
    assert csv["label"].tolist()[1] == "discrete:fact_retrieval_bert_prompts"
    assert csv["p1_P36"].tolist() == [60.0, 50.0, 70.0, 0.0] and "p1_P37" not in csv.columns
    assert csv["gain_p1"].tolist() == pytest.approx([0.0, 5.0, 25.0, -35.0])
    md = (out / "compare.md").read_text()
    assert "| ptuning |" in md and "| P19 | label P19 | N-1 |" in md
    assert (out / "types.png").read_bytes()[:4] == b"\x89PNG"


def test_labels_name_an_init_or_reparam_other_than_the_default():
    assert run_label({"method": "autoprompt", "method_config": {"init": "manual"}}) == "autoprompt+init=manual"
    assert run_label({"method": "autoprompt", "method_config": {"init": "neutral"}}) == "autoprompt"
    assert run_label({"method": "prefix-tuning", "method_config": {"init": "vocab", "reparam": "none"}}) == \
        "prefix-tuning+reparam=none"
    assert run_label({"method": "ptuning-mlp", "method_config": {"lstm": False}}) == "ptuning-mlp"


def test_labels_of_controls():
    assert run_label({"method": None, "control": "majority"}) == "majority"
    assert run_label({"method": "manual", "control": "random-model"}) == "manual+random-model"
    assert run_label({"method": "ptuning", "control": "none"}) == "ptuning"
    assert run_label({"method": None}) == "?"


def test_compare_refuses_mixed_models(runs, tmp_path):
    other = make_run(tmp_path / "runs2" / "e-manual", "manual", [row("P19", "N-1", 10, 30.0), row("P36", "1-1", 30, 30.0)],
                     model="bert", vocab="29k")
    proc = cli_in_process("compare", runs[0], runs[1], other, "--out", tmp_path / "cmp")
    error = assert_user_error(proc, "runs differ in vocab", "'common' in", str(runs[0]), str(runs[1]), f"'29k' in {other}",
                              "--allow-mixed")
    assert "split" not in error and "model" not in error  # runs of several models are compared on their common facts
    assert not (tmp_path / "cmp").exists()
    cmp = compare_runs(load_runs([runs[0], runs[1], other]), allow_mixed=True)
    s = cmp.summary.set_index("label")
    assert list(s.index) == ["manual @ m", "discrete:fact_retrieval_bert_prompts @ m", "manual @ bert"]
    assert s.loc["manual @ bert", "gain_p1"] == 0.0  # its own manual run, not the other model's
    assert s.loc["manual @ m", "facts"] == 40 and "each run on the facts it kept itself" in " ".join(cmp.notes)


def test_compare_errors(tmp_path, runs):
    with pytest.raises(ProbeError, match="nowhere does not exist: expected a run folder or a folder of run folders"):
        load_runs([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="empty is not a run folder"):
        load_runs([tmp_path / "empty"])
    disjoint = make_run(tmp_path / "x", "manual", [row("P101", "N-M", 5, 10.0)])
    with pytest.raises(ProbeError, match="share no relation"):
        compare_runs(load_runs([runs[0], disjoint]))


def _seeded_run(root, name: str, method: str, seed, p1: dict[str, float], failed: tuple[str, ...] = ()):
    """A run folder as `probe train` writes it, with the given test P@1 per relation (`failed`: flagged)."""
    import json as _json

    types = {"P19": "N-1", "P36": "1-1"}
    config = {"command": "train", "model": "m", "vocab": "common", "split": "test_34k", "method": method, "seed": seed,
              "train": {"lr": 0.001, "seed": seed}, "created": f"2026-12-02T10:00:0{seed}", "method_config": {}}
    if seed is None:
        config = {**config, "command": "eval", "train": None}
    rows = [{"relation": r, "label": r, "type": types[r], "n_facts": 10, "p1": v, "p10": 90.0, "mrr": 0.5,
             "fit_failed": r in failed} for r, v in p1.items()]
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(_json.dumps({"config": config, "relations": rows}))
    return folder


def test_runs_that_differ_only_by_seed_are_grouped_with_mean_and_std(tmp_path):
    from probe.comparison import seed_table

    folders = [_seeded_run(tmp_path, "manual", "manual", None, {"P19": 10.0, "P36": 30.0})]
    for seed, (a, b) in zip((1, 2, 3), ((40, 20), (42, 22), (44, 24)), strict=True):
        folders.append(_seeded_run(tmp_path, f"pt{seed}", "ptuning", seed, {"P19": a, "P36": b}))
    for seed, (a, b) in zip((1, 2, 3), ((41, 21), (40, 22), (45, 23)), strict=True):
        folders.append(_seeded_run(tmp_path, f"ptt{seed}", "prompt-tuning", seed, {"P19": a, "P36": b}))
    cmp = compare_runs(load_runs(folders))
    seeds = cmp.seeds.set_index("label")
    assert list(seeds.index) == ["manual", "ptuning", "prompt-tuning"]
    assert seeds.loc["ptuning", "runs"] == 3 and seeds.loc["ptuning", "seeds"] == "1, 2, 3"
    assert seeds.loc["ptuning", "macro_p1_mean"] == 32.0 and seeds.loc["ptuning", "macro_p1_std"] == 2.0
    assert seeds.loc["prompt-tuning", "macro_p1_mean"] == 32.0
    assert seeds.loc["prompt-tuning", "macro_p1_std"] == pytest.approx(3 ** 0.5)  # per seed 31, 31, 34
    assert seeds.loc["ptuning", "p1_N-1_mean"] == 42.0 and seeds.loc["ptuning", "p1_1-1_std"] == 2.0
    assert seeds.loc["manual", "runs"] == 1 and pd.isna(seeds.loc["manual", "macro_p1_std"])
    assert ("ptuning and prompt-tuning: macro P@1 0.00 apart, less than the seed spread (std 2.00): these seeds do "
            "not tell them apart") in cmp.notes
    shown = seed_table(cmp.seeds).set_index("label")
    assert shown.loc["ptuning", "macro_p1"] == "32.00 ± 2.00" and shown.loc["manual", "macro_p1"] == "20.00"
    written = write_comparison(cmp, tmp_path / "out")
    assert tmp_path / "out" / "compare_seeds.csv" in written
    assert "32.00 ± 2.00" in (tmp_path / "out" / "compare.md").read_text()
    # two methods further apart than their seeds spread: no note
    far = [folders[0], *folders[1:4]] + [_seeded_run(tmp_path, f"far{s}", "prompt-tuning", s, {"P19": 60.0 + s, "P36": 40.0})
                                         for s in (1, 2)]
    assert not [n for n in compare_runs(load_runs(far)).notes if "seed spread" in n]
    # a seed run twice is a rerun, not a second seed: said in a note
    rerun = [*folders[1:4], _seeded_run(tmp_path, "pt1-again", "ptuning", 1, {"P19": 41.0, "P36": 20.0})]
    cmp_rerun = compare_runs(load_runs(rerun))
    assert cmp_rerun.seeds.set_index("label").loc["ptuning", "seeds"] == "1, 2, 3, 1"
    assert ("ptuning: seed 1 appears in more than one run (reruns, e.g. of other code): its std is not only a seed "
            "spread") in cmp_rerun.notes
    assert not [n for n in cmp.notes if "appears in more than one run" in n]
    # runs that are all of different settings: no seed table
    assert compare_runs(load_runs([folders[0], folders[1]])).seeds is None


def test_a_relation_no_fact_of_which_every_model_keeps_is_left_out(tmp_path):
    from probe.metrics import relation_metrics

    for model, kept in (("a", {"P19": ["Paris"], "P36": ["Rome"]}), ("b", {"P19": ["Berlin"], "P36": ["Rome"]})):
        run = RunFolder(tmp_path / model, {"command": "eval", "model": model, "method": "manual", "vocab": "common",
                                           "split": "test_34k"})
        for rid, objects in kept.items():
            preds = [{"sub": "X", "obj": o, "rank": 1, "top10": []} for o in objects]
            write_relation(run, rid, {"relation": rid, "type": "N-1", "n_facts": 1, **relation_metrics([1])}, preds)
        run.write_summary()
    cmp = compare_runs(load_runs([tmp_path / "a", tmp_path / "b"]))
    assert cmp.relations == ["P36"] and "left out: P19 (no fact kept by every run)" in cmp.notes
    assert list(cmp.summary["macro_p1"]) == [100.0, 100.0]


def test_relations_flagged_fit_failed_are_counted_and_named(tmp_path):
    ok = _seeded_run(tmp_path, "ok", "ptuning", 1, {"P19": 40.0, "P36": 20.0})
    flagged = _seeded_run(tmp_path, "flagged", "prompt-tuning", 1, {"P19": 40.0, "P36": 0.0}, failed=("P36",))
    cmp = compare_runs(load_runs([ok, flagged]))
    assert cmp.summary.set_index("label")["fit_failed"].to_dict() == {"ptuning": 0, "prompt-tuning": 1}
    assert [n for n in cmp.notes if "fit_failed" in n] == [
        f"prompt-tuning ({flagged}): P36 flagged fit_failed (dev P@1 never rose above the start): their figures are "
        "the untrained prompt's"]
    assert "fit_failed" not in compare_runs(load_runs([ok])).summary.columns
    again = _seeded_run(tmp_path, "again", "prompt-tuning", 2, {"P19": 41.0, "P36": 0.0}, failed=("P19", "P36"))
    seeds = compare_runs(load_runs([ok, flagged, again])).seeds.set_index("label")
    assert seeds["fit_failed"].to_dict() == {"ptuning": 0, "prompt-tuning": 3}


def test_seed_groups_alike_but_for_a_setting_are_told_apart_by_it(tmp_path):
    """Two groups of ptuning seeds that differ only by `pack`: two rows and two series, each named by its pack."""
    import json as _json

    from probe.comparison import run_series

    folders = []
    for pack, shift in ((None, 0.0), (4, 2.0)):
        for seed in (1, 2):
            folder = _seeded_run(tmp_path, f"pt{pack}-{seed}", "ptuning", seed, {"P19": 40.0 + shift + seed, "P36": 20.0})
            results = _json.loads((folder / "results.json").read_text())
            results["config"]["pack"] = pack
            (folder / "results.json").write_text(_json.dumps(results))
            folders.append(folder)
    cmp = compare_runs(load_runs(folders))
    seeds = cmp.seeds.set_index("label")
    assert list(seeds.index) == ["ptuning [pack=null]", "ptuning [pack=4]"]
    assert seeds.loc["ptuning [pack=null]", "macro_p1_mean"] == 30.75 and seeds.loc["ptuning [pack=4]", "macro_p1_mean"] == 31.75
    assert [label for label, _ in run_series(cmp.runs)] == ["ptuning [pack=null] (2 seeds)", "ptuning [pack=4] (2 seeds)"]
