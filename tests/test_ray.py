"""Cells on a real local Ray (2 CPUs): the same files as in process, a killed worker, an interrupted driver,
several models, and the errors of --ray."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, cli_in_process, make_fake_lama, run_cli, save_tiny_llama, write_relation

from probe.commands.eval import run_eval
from probe.commands.train import run_train
from probe.data import LamaData
from probe.errors import Interrupted, ProbeError
from probe.options import Options
from probe.sweep import executor_specs, load_grid, prepare_folder, run_sweep, sweep_command

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

FACTS = {  # two relations with enough facts for a few training steps
    "P19": [("Dante", "Florence"), ("Victor Hugo", "Besancon"), ("Berlin", "Paris"), ("Rome", "Milan"),
            ("Lyon", "Paris"), ("Milan", "Rome")],
    "P36": [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("England", "London"),
            ("Japan", "Tokyo")],
}
VOCAB = ["Paris", "Rome", "Berlin", "Florence", "Madrid", "London", "Tokyo", "Milan", "Besancon", "Lyon"]


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray instance with 2 CPUs for this module (probe joins it instead of starting its own)."""
    from probe.ray_cells import connect

    connect("local", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def lama(tmp_path) -> Path:
    return make_fake_lama(tmp_path / "lama", FACTS, VOCAB)


def grid_file(path: Path, grid_model: Path, steps: int = 4, relations=("P19", "P36"), **axes) -> Path:
    """A grid of ptuning x 2 seeds x the relations (x any other `axes`); `steps` steps each (no early stop before)."""
    lines = [f'model = "{grid_model}"', f"relations = {json.dumps(list(relations))}", 'dtype = "float32"', "[axes]",
             'method = ["ptuning"]',
             "seed = [1, 2]", *(f"{k} = {json.dumps(v)}" for k, v in axes.items()),
             "[train]", f"min_steps = {steps}", "epochs = 1", "batch_size = 2", "eval_every = 2", f"patience = {steps}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cell_rows(out: Path) -> dict[str, dict]:
    """Every finished cell of a sweep folder, without its wall time."""
    return {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
            for p in sorted((out / "cells").glob("*.json"))}


def test_sweep_in_process_and_on_ray_give_the_same_cells(local_ray, tiny_causal_dir, lama, tmp_path):
    grid = grid_file(tmp_path / "g.toml", tiny_causal_dir)
    sweep_command(grid, tmp_path / "here", str(lama), log=lambda m: None)
    sweep_command(grid, tmp_path / "ray", str(lama), log=lambda m: None, ray="local")
    here, there = cell_rows(tmp_path / "here"), cell_rows(tmp_path / "ray")
    assert len(here) == 4  # 2 relations x 2 seeds
    assert here == there
    assert len({row["p1"] for row in here.values()} | {row["dev_p1"] for row in here.values()}) > 1


def test_train_on_ray_writes_the_same_run_folder(local_ray, tiny_causal_dir, lama, tmp_path):
    def options(out: Path, **kw) -> Options:
        return Options(model=[str(tiny_causal_dir)], relation=["P19,P36"], data=str(lama), out=out, dtype="float32",
                       min_steps=4, epochs=1, batch_size=2, eval_every=2, seed=3, **kw)

    (here,) = run_train(options(tmp_path / "here"), log=lambda m: None)
    (there,) = run_train(options(tmp_path / "ray", ray="local", cpus_per_worker=1), log=lambda m: None)
    from safetensors.torch import load_file

    for rid in ("P19", "P36"):
        for name in ("metrics.json", "predictions.jsonl"):
            a, b = (run.folder.root / rid / name for run in (here, there))
            assert a.read_bytes() == b.read_bytes(), (rid, name)
        configs = [json.loads((run.folder.root / rid / "config.json").read_text()) for run in (here, there)]
        # each relation's config says how many torch threads its fit ran on: all of them here, 1 per worker there
        assert [c.pop("torch_threads") for c in configs] == [torch.get_num_threads(), 1]
        assert list(configs[0].items()) == list(configs[1].items())  # the same keys, in the same order
        logs = [[json.loads(line) for line in (run.folder.root / rid / "train_log.jsonl").read_text().splitlines()]
                for run in (here, there)]
        assert [e.get("step") for e in logs[0]] == [e.get("step") for e in logs[1]] and len(logs[0]) > 2
        # the prompt's weights agree to float rounding: 1 torch thread per worker, 2 here, sum in another order
        a, b = (load_file(run.folder.root / rid / "prompt.safetensors") for run in (here, there))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert here.results["summary"] == there.results["summary"]
    assert there.results["config"]["device"] == "cpu"


def test_threads_1_in_process_is_ray_with_1_thread_workers_byte_for_byte(local_ray, tiny_causal_dir, lama, tmp_path):
    """--threads 1 here runs every sum as a 1-thread Ray worker does: the same run folder, prompts byte for byte, in
    bfloat16 (where the thread count moves figures), and both record the count."""
    def options(out: Path, **kw) -> Options:
        return Options(model=[str(tiny_causal_dir)], relation=["P19,P36"], data=str(lama), out=out, min_steps=4,
                       epochs=1, batch_size=2, eval_every=2, seed=3, **kw)

    (here,) = run_train(options(tmp_path / "here", threads=1), log=lambda m: None)
    (there,) = run_train(options(tmp_path / "ray", ray="local", cpus_per_worker=1), log=lambda m: None)
    assert here.results["config"]["dtype"] == "bfloat16"
    assert here.results["config"]["torch_threads"] == there.results["config"]["torch_threads"] == 1
    for rid in ("P19", "P36"):
        for name in ("metrics.json", "predictions.jsonl", "prompt.safetensors", "config.json"):
            a, b = (run.folder.root / rid / name for run in (here, there))
            assert a.read_bytes() == b.read_bytes(), (rid, name)
    assert here.results["relations"] == there.results["relations"]
    # resuming with another thread count is refused, and says how to match
    with pytest.raises(ProbeError) as e:
        run_train(options(tmp_path / "here", threads=2, resume=True), log=lambda m: None)
    assert str(e.value).endswith("(torch_threads: 1 there, 2 asked); pass --threads 1 to continue with its thread count")


def test_a_killed_worker_reruns_its_cell_once(local_ray, tiny_causal_dir, lama, tmp_path):
    """ray.kill on the actor while it trains a cell: Ray restarts it, the cell runs again, and is written once."""
    from probe.ray_cells import RayExecutor

    grid_path = grid_file(tmp_path / "g.toml", tiny_causal_dir, steps=80, relations=["P19"])
    grid = load_grid(grid_path)
    data = LamaData(lama)
    out = tmp_path / "ray"
    prepare_folder(out, grid, {"data": str(lama)})
    executor = RayExecutor(data, grid.vocab, "local")
    killed = []

    def kill_during_first_cell(cell, actor):
        if not killed:
            killed.append(cell.key)
            threading.Timer(0.5, lambda: ray.kill(actor, no_restart=False)).start()  # the cell takes seconds

    executor.on_dispatch = kill_during_first_cell
    written = []
    real_run = executor.run
    executor.run = lambda cells, desc="cells": real_run(cells, on_done=lambda c, o: written.append(c.key), desc=desc)
    run_sweep(grid, ["P19"], out, executor, executor_specs(grid, executor))
    assert executor.retried == killed  # the killed cell ran again, on the restarted actor
    assert sorted(written) == sorted(set(written)) and len(written) == 2  # each cell written exactly once
    assert not [p for p in (out / "cells").iterdir() if p.name.startswith(".")]  # nothing half-written
    # the rerun cell has the figures of an undisturbed run
    sweep_command(grid_path, tmp_path / "here", str(lama), log=lambda m: None)
    assert cell_rows(out) == cell_rows(tmp_path / "here")


def test_an_interrupted_driver_resumes_without_rerunning_finished_cells(local_ray, tiny_causal_dir, lama, tmp_path):
    from probe.ray_cells import RayExecutor

    grid_path = grid_file(tmp_path / "g.toml", tiny_causal_dir)
    grid = load_grid(grid_path)
    data = LamaData(lama)
    out = tmp_path / "sweep"
    prepare_folder(out, grid, {"data": str(lama)})
    executor = RayExecutor(data, grid.vocab, "local", workers=1)
    sent = []

    def stop_at_the_second_cell(cell, actor):
        sent.append(cell.key)
        if len(sent) == 2:
            raise KeyboardInterrupt

    executor.on_dispatch = stop_at_the_second_cell
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, ["P19", "P36"], out, executor, executor_specs(grid, executor))
    finished = cell_rows(out)
    assert list(finished) == [sent[0]]
    before = (out / "cells" / f"{sent[0]}.json").read_bytes()
    proc = run_cli("sweep", grid_path, "--out", out, "--data", lama, "--ray")  # the driver again, on a Ray of its own
    assert proc.returncode == 0, proc.stderr
    assert "1 of 4 cells already done" in proc.stderr
    assert "in the object store" not in proc.stderr  # Ray's restart warning (ray#53727): the data goes with each call
    assert (out / "cells" / f"{sent[0]}.json").read_bytes() == before
    assert len(cell_rows(out)) == 4


@pytest.fixture(scope="module")
def second_model(tmp_path_factory, bpe_tokenizer) -> Path:
    """Another tiny causal LM on the same tokenizer, with other weights."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-b"), bpe_tokenizer, seed=1)


def test_several_models_in_one_eval_then_compare(local_ray, tiny_causal_dir, second_model, lama, tmp_path):
    models = [str(tiny_causal_dir), str(second_model)]
    runs = run_eval(Options(model=models, all=True, data=str(lama), out=tmp_path / "here", dtype="float32"),
                    log=lambda m: None)
    assert [r.folder.root for r in runs] == [tmp_path / "here" / Path(m).name for m in models]
    on_ray = run_eval(Options(model=models, all=True, data=str(lama), out=tmp_path / "ray", dtype="float32", ray="local"),
                      log=lambda m: None)
    for a, b in zip(runs, on_ray, strict=True):
        assert a.results["relations"] == b.results["relations"]
    assert runs[0].results["relations"] != runs[1].results["relations"]  # two different models
    proc = cli_in_process("compare", tmp_path / "here", "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"manual @ {Path(models[0]).name}" in md and f"manual @ {Path(models[1]).name}" in md
    n_facts = sum(r["n_facts"] for r in runs[0].results["relations"])
    assert f"runs of 2 models: every relation is compared on the facts that every run keeps, {n_facts:,} of the {n_facts:,}" in md


def test_objects_of_any_length_on_ray_give_the_same_run(local_ray, tiny_causal_dir, lama, tmp_path):
    """--objects any travels to the workers (each builds the relations' candidates for its tokenizer)."""
    opts = {"model": [str(tiny_causal_dir)], "all": True, "data": str(lama), "dtype": "float32", "objects": "any"}
    here = run_eval(Options(**opts, out=tmp_path / "here"), log=lambda m: None)[0]
    on_ray = run_eval(Options(**opts, out=tmp_path / "ray", ray="local"), log=lambda m: None)[0]
    assert here.results["relations"] == on_ray.results["relations"]
    assert here.results["by_length"] == on_ray.results["by_length"]
    assert on_ray.results["config"]["candidates_per_relation"] == {"P19": 5, "P36": 6}  # Paris twice


def test_compare_of_two_models_uses_only_the_facts_both_keep(tmp_path):
    """A fact one model drops is left out of the other's figures too."""
    from probe.comparison import compare_runs, load_runs
    from probe.runs import RunFolder

    for model, ranks in (("a", {"Paris": 1, "Rome": 3, "Berlin": 1}), ("b", {"Paris": 2, "Rome": 1})):
        run = RunFolder(tmp_path / model, {"command": "eval", "model": model, "method": "manual", "vocab": "common",
                                           "split": "test"})
        preds = [{"sub": s, "obj": o, "rank": ranks[o], "top10": []} for s, o in FACTS["P36"][:3] if o in ranks]
        from probe.metrics import relation_metrics

        write_relation(run, "P36", {"relation": "P36", "type": "1-1", "n_facts": len(preds),
                                  **relation_metrics([p["rank"] for p in preds])}, preds)
        run.write_summary()
    cmp = compare_runs(load_runs([tmp_path / "a", tmp_path / "b"]))
    a, b = cmp.summary.to_dict("records")
    assert (a["label"], b["label"]) == ("manual @ a", "manual @ b")
    assert (a["facts"], a["macro_p1"], b["macro_p1"]) == (2, 50.0, 50.0)  # Berlin, kept by a only, is left out
    assert cmp.runs[0].rows["P36"]["n_own_facts"] == 3


def test_unreachable_cluster_is_one_error_line(tmp_path, lama, tiny_causal_dir):
    # a driver of its own: this test process may hold a Ray instance already
    proc = run_cli("eval", "--all", "--model", tiny_causal_dir, "--data", lama, "--out", tmp_path / "x",
                   "--ray", "127.0.0.1:1")
    assert_user_error(proc, "Ray cluster at 127.0.0.1:1 cannot be reached")
    assert not (tmp_path / "x").exists()


def test_ray_not_installed_is_one_error_line(tmp_path, lama, tiny_causal_dir):
    import subprocess

    code = "import sys; sys.modules['ray'] = None\nimport cli\ncli.main()"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--all", "--model", str(tiny_causal_dir), "--data",
                           str(lama), "--ray"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "--ray needs Ray", "pip install 'probe[ray]'")


def test_cpus_per_worker_without_ray_is_refused(tmp_path, lama, tiny_causal_dir):
    proc = cli_in_process("eval", "--all", "--model", tiny_causal_dir, "--data", lama, "--cpus-per-worker", "2")
    assert_user_error(proc, "--cpus-per-worker applies to --ray only")
    with pytest.raises(ProbeError, match="more than once"):
        run_train(Options(model=["a", "b"], all=True, data=str(lama)))


def test_bare_ray_flag_means_a_local_ray():
    from cli import ray_address_default

    assert ray_address_default(["sweep", "g.toml", "--ray"]) == ["sweep", "g.toml", "--ray", "local"]
    assert ray_address_default(["eval", "--ray", "--all"]) == ["eval", "--ray", "local", "--all"]
    assert ray_address_default(["eval", "--ray", "auto"]) == ["eval", "--ray", "auto"]
    assert ray_address_default(["eval", "--ray", "10.0.0.1:6379", "--all"]) == ["eval", "--ray", "10.0.0.1:6379", "--all"]


def test_interrupted_eval_names_the_parent_folder_of_several_models(tmp_path, tiny_causal_dir, second_model, lama,
                                                                     monkeypatch):
    import probe.commands.eval as command

    def stop(self, loaded):
        raise KeyboardInterrupt

    monkeypatch.setattr(command.EvalCell, "run", stop)
    with pytest.raises(Interrupted) as e:
        run_eval(Options(model=[str(tiny_causal_dir), str(second_model)], all=True, data=str(lama), out=tmp_path / "o",
                         dtype="float32"), log=lambda m: None)
    assert e.value.folder == tmp_path / "o"
    assert (tmp_path / "o" / Path(tiny_causal_dir).name / "results.json").exists()


def test_a_model_axis_in_a_sweep(local_ray, tiny_causal_dir, second_model, lama, tmp_path):
    """`model = [...]` under [axes]: every cell once per model, keyed by it; in process one model after the other,
    on Ray side by side, with the same cells."""
    import pandas as pd

    grid = grid_file(tmp_path / "g.toml", tiny_causal_dir, relations=["P36"], model=[str(tiny_causal_dir),
                                                                                      str(second_model)])
    sweep_command(grid, tmp_path / "here", str(lama), log=lambda m: None)
    sweep_command(grid, tmp_path / "ray", str(lama), log=lambda m: None, ray="local")
    here = cell_rows(tmp_path / "here")
    assert sorted(here) == sorted(f"{Path(m).name}_ptuning_L0_-_-_s{s}_P36" for m in (tiny_causal_dir, second_model)
                                  for s in (1, 2))
    assert here == cell_rows(tmp_path / "ray")
    summary = pd.read_csv(tmp_path / "here" / "summary.csv")
    assert sorted(summary["model"]) == sorted([str(tiny_causal_dir), str(second_model)])
    assert list(summary["seeds"]) == [2, 2]
    rows = {(r["model"], r["seed"]): r["p1"] for r in here.values()}
    for model in (str(tiny_causal_dir), str(second_model)):
        mean = summary.set_index("model").loc[model, "p1_mean"]
        assert mean == pytest.approx((rows[(model, 1)] + rows[(model, 2)]) / 2)


def test_models_that_would_share_a_folder_are_refused(tmp_path, lama):
    with pytest.raises(ProbeError, match="would share the folder name 'gpt2'"):
        run_eval(Options(model=["org1/gpt2", "org2/gpt2"], all=True, data=str(lama), out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    grid = tmp_path / "g.toml"
    grid.write_text('relations = ["P36"]\n[axes]\nmodel = ["a/m.gguf", "b/m.gguf"]\nmethod = ["ptuning"]\n')
    with pytest.raises(ProbeError, match="two models named 'm'"):
        load_grid(grid)
    grid.write_text('relations = ["P36"]\n[axes]\nmethod = ["ptuning", "finetune"]\n')
    with pytest.raises(ProbeError, match='finetune trains the LM\'s weights, in float32: set dtype = "float32"'):
        load_grid(grid)


def test_several_models_without_out_share_one_parent_folder(tiny_causal_dir, second_model, lama, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = run_eval(Options(model=[str(tiny_causal_dir), str(second_model)], relation=["P36"], data=str(lama),
                            dtype="float32"), log=lambda m: None)
    (parent,) = {r.folder.root.parent for r in runs}
    assert parent.parent == Path("runs") and parent.name.startswith("manual-models-")
    assert [r.folder.root.name for r in runs] == [Path(tiny_causal_dir).name, Path(second_model).name]


def test_cuda_on_a_ray_cluster_without_gpus_is_refused(local_ray, tiny_causal_dir, lama, tmp_path):
    with pytest.raises(ProbeError, match="--device cuda: the Ray cluster has no GPU"):
        run_eval(Options(model=[str(tiny_causal_dir)], all=True, data=str(lama), out=tmp_path / "o", device="cuda",
                         ray="local"), log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_a_sweep_on_ray_is_reported_by_the_driver(local_ray, tiny_causal_dir, lama, tmp_path):
    """Each cell's train log comes back from its worker beside its row, and the driver reports it (--report-to)."""
    pytest.importorskip("tensorboard")
    from test_tracking import expected_series, f32, tensorboard_scalars

    grid = grid_file(tmp_path / "g.toml", tiny_causal_dir)
    sweep_command(grid, tmp_path / "ray", str(lama), log=lambda m: None, ray="local", report_to=["tensorboard"])
    logs = sorted((tmp_path / "ray" / "cells").glob("*.train_log.jsonl"))
    assert len(logs) == 4  # 2 relations x 2 seeds
    scalars = tensorboard_scalars(tmp_path / "ray" / "tensorboard")
    for log in logs:
        key = log.name.removesuffix(".train_log.jsonl")
        expected = expected_series(log, key)
        assert expected[f"{key}/loss"] and expected[f"{key}/dev_p1"]
        assert all(scalars[tag] == f32(points) for tag, points in expected.items())
