"""`probe sweep`: grid files, cells, resuming, and the mean ± std tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import assert_user_error, cli_in_process
from test_train import default_splits, make_lama

import probe.sweep
from probe.batching import relation_facts
from probe.cells import InProcess, LoadedModel
from probe.comparison import mean_std
from probe.data import LamaData
from probe.errors import ProbeError
from probe.evaluator import evaluate_facts
from probe.fit import FitTask, fit
from probe.methods import get_method, method_config
from probe.methods.autoprompt import TriggerSearchConfig
from probe.methods.prompt_tuning import PromptTuning
from probe.options import load_template_spec
from probe.sweep import SweepCell, cells_of, grid_models, load_grid, prepare_folder, run_sweep, summarise
from probe.templates import compile_template, parse_template, spread_virtual
from probe.trainer import TrainConfig
from probe.vocab import build_candidates


def write_grid(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


GRID = """
relations = ["P19", "P36"]
[axes]
method = ["prompt-tuning", "prefix-tuning"]
length = [1, 3]
init = ["random", "vocab"]
reparam = ["mlp", "none"]
seed = [1, 2]
[train]
min_steps = 0
epochs = 1
batch_size = 4
eval_every = 1
"""


@pytest.mark.parametrize("n,shape", [(1, "(1, sub, obj)"), (3, "(2, sub, 1, obj)"), (6, "(3, sub, 3, obj)"),
                                     (12, "(6, sub, 6, obj)")])
def test_spread_virtual_over_the_template_slots(n, shape):
    spread = spread_virtual(parse_template("(3, sub, 3, obj)"), n)
    assert spread.source == shape and spread.n_virtual == n
    assert parse_template(spread.source).parts == spread.parts


def test_grid_expands_only_the_axes_a_method_takes(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.toml", GRID))
    cells = cells_of(grid, ["P19", "P36"])
    # prompt-tuning: 2 lengths x 2 inits x 2 seeds; prefix-tuning: 2 x 2 x 2 reparams x 2 seeds; each for 2 relations
    assert len(cells) == (8 + 16) * 2
    assert {c.options["reparam"] for c in cells if c.method == "prompt-tuning"} == {"-"}
    assert len({c.key for c in cells}) == len(cells)


@pytest.mark.parametrize("text,fragment", [
    ("relations = [\"P19\"\n[axes]", "not a valid TOML grid"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"nope\"]", "unknown method 'nope'"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"prefix-tuning\"]\nreparam = [\"lstm\"]", "value 'lstm' does not exist"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"ptuning\"]\ninit = [\"vocab\"]", "applies to none of the methods"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"ptuning\"]\nwidth = [1]", "unknown axis 'width'"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"ptuning\"]\nlength = [0]", "axis 'length' takes whole numbers >= 1"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"manual\"]", "method 'manual' has nothing to train, so nothing to sweep"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"ptuning\", \"manual\"]", "method 'manual' has nothing to train"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"ptuning\"]\n[train]\nlearning_rate = 1", "[train] takes"),
    # [train] keys are the fit settings of the grid's methods: a trigger search has no epochs, a trainer no iterations
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"ptuning\"]\n[train]\niterations = 3", "got ['iterations']"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"autoprompt\"]\n[train]\nepochs = 1",
     "[train] takes batch_size, capitals, dev_size, iterations, patience, top_k for these methods; got ['epochs']"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"autoprompt\"]\n[train]\ntop_k = 0", "[train] for autoprompt: --top-k must be"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"ptuning\"]\n[train]\nepochs = 0", "[train] for ptuning: --epochs must be"),
    ("relations = [\"P19\"]\n[axes]\nmethod = [\"ptuning\"]\n[train]\nseed = 3", "got ['seed']"),  # seeds are an axis
    ("[axes]\nmethod = [\"ptuning\"]", "needs `relations`"),
])
def test_bad_grid_files_are_one_clear_error(tmp_path, text, fragment):
    path = write_grid(tmp_path / "bad.toml", text)
    with pytest.raises(ProbeError) as e:
        load_grid(path)
    assert fragment in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_grid_is_one_error_line(tmp_path):
    path = write_grid(tmp_path / "bad.toml", "relations = [\"P19\"]\n[axes]\nmethod = [\"prefix-tuning\"]\ninit = [\"zeros\"]")
    assert_user_error(cli_in_process("sweep", path, "--out", tmp_path / "out"), "init value 'zeros' does not exist")
    assert not (tmp_path / "out").exists()


def test_sweep_runs_resumes_and_summarises(causal_backend, tmp_path, monkeypatch):
    lama = LamaData(make_lama(tmp_path / "lama", default_splits()))
    grid = load_grid(write_grid(tmp_path / "g.toml", GRID.replace('"prompt-tuning", ', "").replace("[1, 3]", "[2]")
                                .replace('["mlp", "none"]', '["none"]')))
    cands = build_candidates(causal_backend.tokenizer, lama.vocab_words("common"))
    out = tmp_path / "sweep"
    prepare_folder(out, grid, {"data": "x"})
    ran = []
    real = probe.sweep.cell.run_cell

    def counting(loaded, cell, *args):
        ran.append(cell)
        return real(loaded, cell, *args)

    monkeypatch.setattr(probe.sweep.cell, "run_cell", counting)
    cells = cells_of(grid, ["P19", "P36"])
    assert len(cells) == 8  # 2 inits x 2 seeds x 2 relations
    (out / "cells").mkdir(exist_ok=True)
    df = sweep_here(causal_backend, lama, grid, ["P19", "P36"], cands, out)
    assert len(ran) == 8 and len(df) == 8
    assert set(df["template"]) == {"(2, sub, obj)"}  # prefix-tuning: the prefix first
    # a second run does nothing; removing one cell re-runs exactly that cell
    sweep_here(causal_backend, lama, grid, ["P19", "P36"], cands, out)
    assert len(ran) == 8
    (out / "cells" / f"{cells[3].key}.json").unlink()
    df2 = sweep_here(causal_backend, lama, grid, ["P19", "P36"], cands, out)
    assert [c.key for c in ran[8:]] == [cells[3].key]
    assert df2.sort_values("seed").reset_index(drop=True).drop(columns="seconds").equals(
        df.sort_values("seed").reset_index(drop=True).drop(columns="seconds"))
    # the summary: macro over relations per seed, then mean and sample std over seeds
    summary = pd.read_csv(out / "summary.csv")
    for init, group in df.groupby("init"):
        per_seed = group.groupby("seed")["p1"].mean()
        row = summary[summary["init"] == init].iloc[0]
        assert row["p1_mean"] == pytest.approx(per_seed.mean())
        assert row["p1_std"] == pytest.approx(per_seed.std(ddof=1))
        assert row["seeds"] == 2 and row["relations"] == 2
    md = (out / "summary.md").read_text()
    assert md.count("±") == 1 + 2 * len(summary)  # the header, then P@1 and dev P@1 of each setting
    for r in summary.to_dict("records"):
        assert f"{r['p1_mean']:.2f} ± {r['p1_std']:.2f}" in md and f"{r['dev_p1_mean']:.2f} ± {r['dev_p1_std']:.2f}" in md
    assert (out / "length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = json.loads((out / "cells" / f"{cells[0].key}.json").read_text())
    assert (first["method"], first["length"], first["reparam"], first["seed"]) == ("prefix-tuning", 2, "none", 1)
    same = df[(df["relation"] == "P19") & (df["seed"] == 1) & (df["init"] == first["init"])]
    assert same["p1"].tolist() == [first["p1"]]
    # the same figures when the cell is trained and tested again by hand, with the grid's settings
    train_settings = {"min_steps": 0, "epochs": 1, "batch_size": 4, "eval_every": 1}
    metrics, result, template = recomputed_cell(causal_backend, lama, cells[0], train_settings, cands)
    assert first["template"] == template == "(2, sub, obj)"
    assert {k: first[k] for k in ("p1", "p10", "mrr")} == {k: metrics[k] for k in ("p1", "p10", "mrr")}
    assert (first["dev_p1"], first["steps"], first["best_step"]) == (result.best_dev["p1"], result.steps, result.best_step)
    assert first["n_facts"] == 6 and first["n_train"] == 8  # the test fact of Ravenna (not a candidate) is left out
    # a third seed added to the grid, run into the same folder: only its cells run, and the tables hold all three
    grid3 = load_grid(write_grid(tmp_path / "g3.toml", (tmp_path / "g.toml").read_text().replace("[1, 2]", "[1, 2, 3]")))
    prepare_folder(out, grid3, {"data": "x"})
    df3 = sweep_here(causal_backend, lama, grid3, ["P19", "P36"], cands, out)
    assert sorted((c.seed, c.relation) for c in ran[9:]) == sorted([(3, "P19"), (3, "P36")] * 2)
    assert len(df3) == 12 and set(pd.read_csv(out / "summary.csv")["seeds"]) == {3}


def sweep_here(backend, data, grid, relation_ids, candidates, out):
    """`run_sweep` on an executor holding a loaded backend (as `probe sweep` runs it on the models it loads)."""
    loaded = LoadedModel(backend, data, candidates)
    return run_sweep(grid, relation_ids, out, InProcess(data, loaded=loaded), {m: loaded.spec for m in grid_models(grid)})


def recomputed_cell(backend, data, cell: SweepCell, train_settings: dict, candidates):
    """A cell trained and tested again without the sweep: (test metrics, fit result, template source)."""
    relation = data.relation(cell.relation)
    template = spread_virtual(load_template_spec(None, cell.method).template_for(relation.id, backend.kind), cell.length)
    compiled = compile_template(template, backend.tokenizer, backend.kind, manual=relation.template)
    options = {k: v for k, v in cell.options.items() if v != "-"}
    method_cls = get_method(cell.method)
    fit_config = method_cls.fit_config(**train_settings, seed=cell.seed)
    train, _ = relation_facts(data, relation, "train", candidates, False)
    dev, _ = relation_facts(data, relation, "dev", candidates, False)
    test, _ = relation_facts(data, relation, "test_34k", candidates, False)
    fitted = fit(backend, FitTask(compiled, train, dev or train, candidates, fit_config, method_cls,
                                  method_config(cell.method, **options), relation.template))
    prompt, result = fitted.prompt, fitted.result
    return evaluate_facts(backend, prompt, compiled, test, candidates).metrics, result, template.source


def test_mixed_grid_gives_each_method_its_own_fit_settings(tmp_path):
    text = """
relations = ["P19"]
[axes]
method = ["autoprompt", "prompt-tuning"]
[train]
iterations = 3
top_k = 2
epochs = 1
min_steps = 0
batch_size = 4
"""
    grid = load_grid(write_grid(tmp_path / "g.toml", text))
    assert grid.train == {"iterations": 3, "top_k": 2, "epochs": 1, "min_steps": 0, "batch_size": 4}
    assert [c.method for c in cells_of(grid, ["P19"])] == ["autoprompt", "prompt-tuning"]
    assert [c.options["init"] for c in cells_of(grid, ["P19"])] == ["neutral", "vocab"]  # the methods' defaults, named
    # a shared key is checked for each method: patience 0 never stops a trigger search, but the trainer needs 1
    with pytest.raises(ProbeError, match=r"\[train\] for prompt-tuning: --patience must be at least 1"):
        load_grid(write_grid(tmp_path / "h.toml", text + "patience = 0\n"))


def test_autoprompt_can_be_swept(causal_backend, tmp_path, monkeypatch):
    lama = LamaData(make_lama(tmp_path / "lama", default_splits()))
    grid = load_grid(write_grid(tmp_path / "g.toml", """
relations = ["P19"]
[axes]
method = ["autoprompt", "prompt-tuning"]
length = [2]
seed = [1, 2]
[train]
iterations = 3
top_k = 2
capitals = false
epochs = 1
min_steps = 0
batch_size = 4
"""))
    cands = build_candidates(causal_backend.tokenizer, lama.vocab_words("common"))
    out = tmp_path / "sweep"
    prepare_folder(out, grid, {"data": "x"})
    fitted = []
    real = probe.sweep.cell.fit

    def spy(backend, task):
        fitted.append((task.method.name, task.config))
        return real(backend, task)

    monkeypatch.setattr(probe.sweep.cell, "fit", spy)
    df = sweep_here(causal_backend, lama, grid, ["P19"], cands, out)
    assert df["method"].tolist() == ["autoprompt", "autoprompt", "prompt-tuning", "prompt-tuning"]
    # each method got its own settings from [train], and the cell's seed
    assert fitted == [
        ("autoprompt", TriggerSearchConfig(iterations=3, top_k=2, batch_size=4, capitals=False, seed=1)),
        ("autoprompt", TriggerSearchConfig(iterations=3, top_k=2, batch_size=4, capitals=False, seed=2)),
        ("prompt-tuning", TrainConfig(lr=PromptTuning.default_lr, epochs=1, min_steps=0, batch_size=4, seed=1)),
        ("prompt-tuning", TrainConfig(lr=PromptTuning.default_lr, epochs=1, min_steps=0, batch_size=4, seed=2)),
    ]
    monkeypatch.undo()
    for cell, row in zip(cells_of(grid, ["P19"]), df.to_dict("records"), strict=True):
        settings = {k: v for k, v in grid.train.items() if k in TriggerSearchConfig.__dataclass_fields__} \
            if cell.method == "autoprompt" else {"epochs": 1, "min_steps": 0, "batch_size": 4}
        metrics, result, template = recomputed_cell(causal_backend, lama, cell, settings, cands)
        assert row["template"] == template == "(1, sub, 1, obj)"
        assert (row["p1"], row["mrr"], row["dev_p1"], row["steps"]) == (metrics["p1"], metrics["mrr"],
                                                                        result.best_dev["p1"], result.steps)
    assert df.loc[df["method"] == "autoprompt", "steps"].tolist() == [3, 3]  # patience 10 > 3 iterations: no early stop


def test_autoprompt_init_manual_cell_starts_from_the_manual_prompt(causal_backend, tmp_path):
    lama = LamaData(make_lama(tmp_path / "lama", default_splits()))
    grid = load_grid(write_grid(tmp_path / "g.toml", """
relations = ["P19"]
[axes]
method = ["autoprompt"]
init = ["manual"]
[train]
iterations = 1
top_k = 1
"""))
    cands = build_candidates(causal_backend.tokenizer, lama.vocab_words("common"))
    prepare_folder(tmp_path / "sweep", grid, {"data": "x"})
    (row,) = sweep_here(causal_backend, lama, grid, ["P19"], cands, tmp_path / "sweep").to_dict("records")
    assert row["init"] == "manual"
    assert row["template"] == '(sub, ["was born in"], obj)'  # as `probe train --method autoprompt --init manual`


def test_autoprompt_init_manual_with_a_length_axis_is_refused(tmp_path):
    path = write_grid(tmp_path / "g.toml", """
relations = ["P19"]
[axes]
method = ["autoprompt"]
init = ["manual"]
length = [2]
""")
    with pytest.raises(ProbeError) as e:
        load_grid(path)
    assert str(e.value) == (f"{path}: autoprompt: --init manual builds each relation's template from its manual prompt: "
                            "drop --template (a sweep's template and length axis count as a template)")


def test_sweep_folder_with_other_shared_settings_is_refused(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.toml", GRID))
    prepare_folder(tmp_path / "out", grid, {"data": "x"})
    other = load_grid(write_grid(tmp_path / "h.toml", GRID.replace("epochs = 1", "epochs = 2")))
    with pytest.raises(ProbeError, match="was made with other settings"):
        prepare_folder(tmp_path / "out", other, {"data": "x"})
    prepare_folder(tmp_path / "out", load_grid(write_grid(tmp_path / "i.toml", GRID.replace("[1, 2]", "[1, 2, 3]"))),
                   {"data": "x"})  # more seeds: the same shared settings, so the folder is reused


def test_summarise_single_seed_has_no_std():
    df = pd.DataFrame([{"method": "ptuning", "length": 3, "init": "-", "reparam": "-", "seed": 1, "relation": r, "p1": p,
                        "dev_p1": p} for r, p in (("P19", 10.0), ("P36", 30.0))])
    (row,) = summarise(df).to_dict("records")
    assert row["p1_mean"] == 20.0 and pd.isna(row["p1_std"])
    assert mean_std(row["p1_mean"], row["p1_std"]) == "20.00"  # summary.md shows no "± nan"
    assert mean_std(20.0, 1.234) == "20.00 ± 1.23" and mean_std(None, None) == ""


def test_cli_sweep_end_to_end_and_resume(tiny_causal_dir, tmp_path):
    lama = make_lama(tmp_path / "lama", default_splits())
    grid = write_grid(tmp_path / "g.toml", f"""
model = "{tiny_causal_dir}"
relations = ["P19"]
dtype = "float32"
[axes]
method = ["prefix-tuning", "prompt-tuning"]
length = [2]
seed = [1, 2]
[train]
min_steps = 0
epochs = 1
batch_size = 4
""")
    out = tmp_path / "sweep"
    first = cli_in_process("sweep", grid, "--out", out, "--data", lama)
    assert first.returncode == 0, first.stderr
    cells = pd.read_csv(out / "cells.csv")
    assert sorted(cells["method"]) == ["prefix-tuning", "prefix-tuning", "prompt-tuning", "prompt-tuning"]
    assert set(cells["template"]) == {"(2, sub, obj)", "(1, sub, 1, obj)"}
    assert "macro P@1 (mean ± std over seeds)" in first.stdout
    again = cli_in_process("sweep", grid, "--out", out, "--data", lama)
    assert again.returncode == 0 and "4 of 4 cells already done" in again.stderr
    assert pd.read_csv(out / "cells.csv").drop(columns="seconds").equals(cells.drop(columns="seconds"))


def test_a_cell_finished_by_another_process_is_skipped(causal_backend, tmp_path, monkeypatch):
    """Two processes can share a folder: a cell that appears while the sweep runs is not trained again."""
    lama = LamaData(make_lama(tmp_path / "lama", default_splits()))
    grid = load_grid(write_grid(tmp_path / "g.toml", 'relations = ["P19"]\n[axes]\nmethod = ["ptuning"]\nseed = [1, 2, 3]'))
    cells = cells_of(grid, ["P19"])
    out = tmp_path / "sweep"
    prepare_folder(out, grid, {"data": "x"})
    ran = []

    def fake_cell(loaded, cell, *args):
        ran.append(cell.seed)
        if cell.seed == 1:  # meanwhile, "another process" finishes seed 2
            (out / "cells" / f"{cells[1].key}.json").write_text(json.dumps({**cell.settings(), "seed": 2, "p1": 5.0,
                                                                              "dev_p1": 5.0}))
        return {**cell.settings(), "p1": 10.0 * cell.seed, "dev_p1": 0.0}

    monkeypatch.setattr(probe.sweep.cell, "run_cell", fake_cell)
    df = sweep_here(causal_backend, lama, grid, ["P19"], [], out)
    assert ran == [1, 3]
    assert sorted(df["p1"]) == [5.0, 10.0, 30.0]
