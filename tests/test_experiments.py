"""The seed papers' experiments (issue 32): prompts below the manual one flagged and, asked for, replaced by it; the
AutoPrompt preset of its paper's budget; the shipped ablation grids; the length figure and its CSV."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_user_error, cli_in_process
from test_train import default_splits, make_lama

from probe.comparison import compare_runs, load_runs
from probe.errors import ProbeError
from probe.methods import get_method
from probe.sweep import cells_of, load_grid

REPO_SWEEPS = ["prompt_length_init.toml", "reparam.toml", "prefix_8rel.toml"]


# ---- below the manual prompt on dev ------------------------------------------------------------------------------


def manual_lama(root, backend):
    """A LAMA folder where the manual prompt of P19 ranks every gold first (its facts' objects are its own top
    predictions: no untrained prompt beats it) and that of P36 ranks every gold last."""
    from test_train import CANDIDATES, SUBJECTS

    from probe.data import Fact
    from probe.evaluator import evaluate_facts
    from probe.templates import compile_template
    from probe.vocab import build_candidates

    cands = build_candidates(backend.tokenizer, CANDIDATES)
    facts = {}
    for rid, template, place in (("P19", "[X] was born in [Y] .", 0), ("P36", "The capital of [X] is [Y] .", -1)):
        compiled = compile_template(template, backend.tokenizer, backend.kind)
        ranked = evaluate_facts(backend, None, compiled, [Fact(s, CANDIDATES[0]) for s in SUBJECTS[:12]], cands)
        order = {f.sub: top for f, top in zip(ranked.facts, ranked.top10, strict=True)}
        if place == 0:
            facts[rid] = [(s, order[s][0]) for s in SUBJECTS[:12]]
        else:
            facts[rid] = [(s, next(w for w in reversed(CANDIDATES) if w not in order[s])) for s in SUBJECTS[:12]]
    return make_lama(root, {"train": {r: f[:8] for r, f in facts.items()}, "dev": {r: f[8:] for r, f in facts.items()},
                            "test_34k": {r: f[8:] for r, f in facts.items()}})


def _train(tmp_path, tiny_causal_dir, lama, name, *extra):
    out = tmp_path / name
    proc = cli_in_process("train", "--model", tiny_causal_dir, "--data", lama, "-r", "P19,P36", "--out", out,
                          "--dtype", "float32", "--epochs", "1", "--min-steps", "0", "--batch-size", "4",
                          "--lr", "1e-9", "--eval-every", "1", *extra)  # lr too small to move: nothing beats the start
    assert proc.returncode == 0, proc.stderr
    return out, proc, json.loads((out / "results.json").read_text())


def test_a_prompt_below_the_manual_one_on_dev_is_flagged_and_counted(tmp_path, tiny_causal_dir, causal_backend):
    lama = manual_lama(tmp_path / "lama", causal_backend)
    out, proc, results = _train(tmp_path, tiny_causal_dir, lama, "run")
    rows = {r["relation"]: r for r in results["relations"]}
    below = sorted(r for r, row in rows.items() if row["dev_p1"] < row["manual_dev_p1"])
    assert below == ["P19"] and rows["P19"]["manual_dev_p1"] == 100.0
    assert [r for r, row in rows.items() if row["below_manual"]] == below == results["below_manual"]
    assert all(not row["below_manual"] for r, row in rows.items() if r not in below)
    assert f"below the manual prompt on dev ({len(below)}): {', '.join(below)}" in proc.stdout
    assert "**Below the manual prompt on dev**" in (out / "summary.md").read_text()
    assert f"warning: {below[0]}: the trained prompt's dev P@1" in proc.stderr
    cmp = compare_runs(load_runs([out]))
    assert cmp.summary["below_manual"].tolist() == [len(below)]
    assert any("flagged below_manual" in n for n in cmp.notes)


def test_fallback_manual_keeps_the_manual_prompt_and_says_so(tmp_path, tiny_causal_dir, causal_backend):
    lama = manual_lama(tmp_path / "lama", causal_backend)
    plain, _, trained = _train(tmp_path, tiny_causal_dir, lama, "plain")
    out, proc, results = _train(tmp_path, tiny_causal_dir, lama, "fallback", "--fallback", "manual")
    assert results["config"]["fallback"] == "manual"
    before = {r["relation"]: r for r in trained["relations"]}
    for row in results["relations"]:
        old = before[row["relation"]]
        if old["below_manual"]:  # the manual prompt's test figures and predictions, the trained ones kept beside
            assert row["kept"] == "manual" and row["below_manual"]
            assert (row["p1"], row["mrr"], row["dev_p1"]) == (old["manual_p1"], old["manual_mrr"], old["manual_dev_p1"])
            assert (row["trained_p1"], row["trained_dev_p1"]) == (old["p1"], old["dev_p1"])
            assert row["template"] == json.loads((out / row["relation"] / "config.json").read_text())["template"]
        else:
            assert "kept" not in row and row["p1"] == old["p1"]
    assert results["kept_manual"] == results["below_manual"]
    assert "the manual prompt kept for" in proc.stdout
    rerun = cli_in_process("eval", "--prompts", out)  # the kept manual prompt re-evaluates exactly, too
    assert rerun.returncode == 0 and "2 of 2 relations reproduce the saved test figures exactly" in rerun.stdout


def test_a_bad_fallback_is_one_error_line(tmp_path, fake_lama):
    proc = cli_in_process("train", "-r", "P19", "--data", fake_lama, "--model", tmp_path / "none", "--fallback", "vocab")
    assert_user_error(proc, "--fallback 'vocab': expected manual")


# ---- AutoPrompt at its paper's budget -----------------------------------------------------------------------------


def test_the_paper_preset_is_autoprompts_lama_budget_and_flags_override_it():
    cls = get_method("autoprompt")
    paper = cls.fit_config("paper")
    assert (paper.iterations, paper.top_k, paper.batch_size, paper.dev_size, paper.patience) == (1000, 10, 20, 100, 0)
    assert cls.fit_config("paper", iterations=50).iterations == 50
    with pytest.raises(ProbeError, match="--preset 'fast' does not exist for method 'autoprompt' \\(expected one of paper\\)"):
        cls.fit_config("fast")
    with pytest.raises(ProbeError, match="does not exist for method 'ptuning' \\(expected none: it has no presets\\)"):
        get_method("ptuning").fit_config("paper")


def test_dev_checks_use_a_fixed_sample_of_dev_facts(causal_backend, tmp_path):
    """dev_size 3: every dev check of the search ranks the same 3 of the 8 dev facts."""
    import torch

    from probe.data import Fact
    from probe.fit import FitTask, fit
    from probe.methods.autoprompt import TriggerSearchConfig
    from probe.templates import compile_template
    from probe.vocab import build_candidates

    words = ["Paris", "Rome", "Berlin", "Florence", "London"]
    cands = build_candidates(causal_backend.tokenizer, words)
    subjects = ["Dante", "Victor", "Hugo", "Aaron", "Abbey", "Abraham", "Abel", "Abigail"]
    facts = [Fact(s, words[i % 5]) for i, s in enumerate(subjects)]
    compiled = compile_template("(1, sub, 1, obj)", causal_backend.tokenizer, "causal")
    seen = []
    real = causal_backend.score

    def spy(batches, prompt, candidates):
        if not torch.is_grad_enabled():
            seen.append(sorted(f.sub for b in batches for f in b.facts))
        return real(batches, prompt, candidates)

    causal_backend.score = spy
    try:
        config = TriggerSearchConfig(iterations=3, top_k=2, batch_size=4, dev_size=3, patience=0, seed=5)
        fit(causal_backend, FitTask(compiled, facts, facts, cands, config, get_method("autoprompt"), None,
                                    "[X] was born in [Y] ."))
    finally:
        del causal_backend.score
    dev_checks = [s for s in seen if len(s) == 3]
    assert dev_checks and all(s == dev_checks[0] for s in dev_checks)


def test_preset_on_the_command_line(tmp_path, fake_lama):
    proc = cli_in_process("train", "-r", "P19", "--data", fake_lama, "--model", tmp_path / "none", "--preset", "paper")
    assert_user_error(proc, "--preset 'paper' does not exist for method 'ptuning'")


# ---- the shipped grids and the length figure ------------------------------------------------------------------------


@pytest.mark.parametrize("name", REPO_SWEEPS)
def test_the_shipped_grids_parse_into_their_cells(name):
    from conftest import REPO

    grid = load_grid(REPO / "sweeps" / name)
    cells = cells_of(grid, grid.relations)
    assert len(grid.relations) == 8
    expected = {"prompt_length_init.toml": 5 * 3 * 3 * 8, "reparam.toml": 3 * 3 * 3 * 8, "prefix_8rel.toml": 2 * 2 * 2 * 3 * 8}
    assert len(cells) == len({c.key for c in cells}) == expected[name]
    if name == "reparam.toml":
        assert {c.method for c in cells} == {"ptuning", "ptuning-mlp", "prompt-tuning"}
        assert {c.length for c in cells} == {6, 12, 24}
    if name == "prompt_length_init.toml":
        assert {c.options["init"] for c in cells} == {"random", "vocab", "template"} and grid.template == "(1, sub, obj)"


def test_the_length_figure_plots_the_cells_mean_and_std_over_seeds(tiny_causal_dir, tmp_path):
    lama = make_lama(tmp_path / "lama", default_splits())
    grid = tmp_path / "g.toml"
    grid.write_text(f"""
model = "{tiny_causal_dir}"
relations = ["P19", "P36"]
dtype = "float32"
template = "(1, sub, obj)"
[axes]
method = ["prompt-tuning"]
length = [1, 4]
init = ["random", "vocab"]
seed = [1, 2]
[train]
min_steps = 0
epochs = 1
batch_size = 4
""")
    out = tmp_path / "sweep"
    proc = cli_in_process("sweep", grid, "--out", out, "--data", lama)
    assert proc.returncode == 0, proc.stderr
    cells = pd.read_csv(out / "cells.csv")
    points = pd.read_csv(out / "length.csv")
    assert (out / "length.png").stat().st_size > 0
    lines = points.dropna(subset=["length"])
    assert sorted(lines["series"].unique()) == ["prompt-tuning / init=random", "prompt-tuning / init=vocab"]
    for row in lines.to_dict("records"):
        init = row["series"].split("=")[1]
        mine = cells[(cells["init"] == init) & (cells["length"] == row["length"])]
        per_seed = mine.groupby("seed")["p1"].mean()  # macro over the relations, for each seed
        assert row["macro_p1_mean"] == pytest.approx(per_seed.mean(), abs=1e-9)
        assert row["macro_p1_std"] == pytest.approx(per_seed.std(ddof=1), abs=1e-9)
        assert (row["seeds"], row["relations"]) == (2, 2)
    (manual,) = points[points["series"] == "manual prompt"].to_dict("records")
    assert manual["macro_p1_mean"] == pytest.approx(cells.groupby("relation")["manual_p1"].first().mean())
    assert math.isnan(manual["length"])
    # the seeds run in two folders and merged (benchmarks/internal/merge_sweeps.py) draw the same figure
    for seed in (1, 2):
        (tmp_path / f"s{seed}").mkdir()
        cells[cells["seed"] == seed].to_csv(tmp_path / f"s{seed}" / "cells.csv", index=False)
    merge = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "internal" / "merge_sweeps.py"))["main"]
    merge(str(tmp_path / "merged"), [str(tmp_path / "s1"), str(tmp_path / "s2")])
    assert pd.read_csv(tmp_path / "merged" / "length.csv").equals(points)
    with pytest.raises(SystemExit, match=r"8 cell\(s\) are in more than one folder"):
        merge(str(tmp_path / "twice"), [str(tmp_path / "s1"), str(tmp_path / "s1")])
    # probe compare on the sweep folder draws it too, with a compared run as a reference line
    run = tmp_path / "manual-run"
    assert cli_in_process("eval", "--model", tiny_causal_dir, "--data", lama, "-r", "P19,P36", "--out", run).returncode == 0
    drawn = cli_in_process("compare", out, run, "--out", tmp_path / "cmp")
    assert drawn.returncode == 0, drawn.stderr
    again = pd.read_csv(tmp_path / "cmp" / "sweep-length.csv")
    assert again.dropna(subset=["length"]).reset_index(drop=True).equals(lines.reset_index(drop=True))
    manual_run = json.loads((run / "results.json").read_text())["summary"]["all"]["macro_p1"]
    assert again.set_index("series").loc["manual", "macro_p1_mean"] == pytest.approx(manual_run)


def test_compare_draws_runs_of_other_seeds_as_one_bar(tmp_path):
    from conftest import write_relation

    from probe.comparison import manual_points, run_series, series_figures
    from probe.runs import RunFolder

    folders = []
    for seed, p1 in ((1, 40.0), (2, 50.0), (3, 60.0)):
        run = RunFolder(tmp_path / f"s{seed}", {"command": "train", "model": "m", "method": "ptuning", "seed": seed,
                                                "split": "test_34k", "vocab": "common"})
        for rid in ("P19", "P36"):
            write_relation(run, rid, {"relation": rid, "type": "N-1" if rid == "P19" else "1-1", "n_facts": 1, "p1": p1,
                                      "p10": p1, "mrr": 0.5, "manual_p1": 10.0, "manual_p10": 10.0, "manual_mrr": 0.1})
        run.write_summary()
        folders.append(run.root)
    cmp = compare_runs(load_runs(folders))
    series = run_series(cmp.runs)
    assert series == [("ptuning (3 seeds)", [0, 1, 2])]
    means, stds = series_figures(cmp, series)["ptuning (3 seeds)"]
    assert means[0] == pytest.approx(50.0) and stds[0] == pytest.approx(10.0)
    xs, ys = manual_points(cmp, series)["ptuning (3 seeds)"]
    assert xs == [10.0, 10.0] and ys == pytest.approx([50.0, 50.0])
