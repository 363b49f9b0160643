"""--report-to: what TensorBoard's event files, mlflow's file store and wandb's offline run hold is read back with the
trackers' own readers and compared with train_log.jsonl and metrics.json."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_user_error, cli_in_process

RELATIONS = ("P19", "P36")
TRAIN = ["--epochs", "1", "--min-steps", "6", "--eval-every", "2", "--batch-size", "2", "--threads", "1",
         "--dtype", "float32"]
CURVES = ("loss", "lr", "dev_p1", "dev_mrr")


def expected_series(log: Path, series: str) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) points a train log gives each tag: `<series>/<key>`, a retry as `<series>_attempt<n>/<key>`."""
    out: dict[str, list[tuple[int, float]]] = {}
    attempt = 0
    for row in map(json.loads, log.read_text().splitlines()):
        attempt += "config" in row
        name = series if attempt == 1 else f"{series}_attempt{attempt}"
        for key in CURVES:
            if key in row:
                out.setdefault(f"{name}/{key}", []).append((row["step"], row[key]))
    return out


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """What TensorBoard stores: float32 values."""
    return [(s, float(np.float32(v))) for s, v in points]


def mlflow_run(store: Path):
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("probe").experiment_id])
    return client, run


@pytest.fixture(scope="module")
def tracked_run(tiny_causal_dir, tmp_path_factory, monkeypatch_module):
    """A two-relation train run on the tiny causal model with two fits at once, reported to TensorBoard and mlflow."""
    from tests.conftest import make_fake_lama

    root = tmp_path_factory.mktemp("tracked")
    lama = make_fake_lama(root / "lama")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    proc = cli_in_process("train", "--model", tiny_causal_dir, "--data", lama, "-r", ",".join(RELATIONS), *TRAIN,
                          "--jobs", "2", "--out", root / "run", "--report-to", "tensorboard", "--report-to", "mlflow")
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_tensorboard_holds_the_train_logs_and_test_figures(tracked_run):
    events = list((tracked_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # one tracking run, inside the run folder
    scalars = tensorboard_scalars(tracked_run / "tensorboard")
    for rid in RELATIONS:
        expected = expected_series(tracked_run / rid / "train_log.jsonl", rid)
        assert {f"{rid}/loss", f"{rid}/dev_p1", f"{rid}/dev_mrr", f"{rid}/lr"} <= set(expected)
        for tag, points in expected.items():
            assert scalars[tag] == f32(points), tag
        metrics = json.loads((tracked_run / rid / "metrics.json").read_text())
        last = max(s for pts in expected.values() for s, _ in pts)
        for key in ("p1", "p10", "mrr"):
            assert scalars[f"{rid}/test_{key}"] == f32([(last, metrics[key])])


def test_tensorboard_holds_the_run_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    (text,) = acc.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    config = json.loads((tracked_run / "config.json").read_text())
    assert json.loads(shown.strip("`\n"))["method"] == config["method"] == "ptuning"
    assert json.loads(shown.strip("`\n"))["train.eval_every"] == 2


def test_mlflow_file_store_holds_the_train_logs_params_and_test_figures(tracked_run):
    client, run = mlflow_run(tracked_run / "mlruns")
    assert run.info.run_name == tracked_run.name and run.info.status == "FINISHED"
    config = json.loads((tracked_run / "config.json").read_text())
    assert run.data.params["model"] == config["model"]
    assert run.data.params["train.eval_every"] == "2" and run.data.params["method"] == "ptuning"
    for rid in RELATIONS:
        expected = expected_series(tracked_run / rid / "train_log.jsonl", rid)
        for tag, points in expected.items():
            assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)] == points, tag
        metrics = json.loads((tracked_run / rid / "metrics.json").read_text())
        for key in ("p1", "p10", "mrr"):
            assert run.data.metrics[f"{rid}/test_{key}"] == metrics[key]


def test_sweep_reports_each_cell_as_its_own_series(tiny_causal_dir, fake_lama, tmp_path):
    """A sweep cell's train log is written beside its row, and TensorBoard holds it under the cell's key."""
    grid = tmp_path / "g.toml"
    grid.write_text(f"""
model = "{tiny_causal_dir}"
relations = ["P19", "P36"]
template = "(1, sub, obj)"
dtype = "float32"
[axes]
method = ["prompt-tuning"]
init = ["random"]
seed = [1]
[train]
min_steps = 4
epochs = 1
batch_size = 2
eval_every = 2
""")
    out = tmp_path / "sweep"
    proc = cli_in_process("sweep", grid, "--out", out, "--data", fake_lama, "--threads", "1", "--report-to",
                          "tensorboard")
    assert proc.returncode == 0, proc.stderr
    logs = sorted((out / "cells").glob("*.train_log.jsonl"))
    assert len(logs) == 2 and len(list((out / "cells").glob("*.json"))) == 2
    scalars = tensorboard_scalars(out / "tensorboard")
    for log in logs:
        key = log.name.removesuffix(".train_log.jsonl")
        row = json.loads((out / "cells" / f"{key}.json").read_text())
        expected = expected_series(log, key)
        assert expected[f"{key}/loss"] and expected[f"{key}/dev_p1"]
        for tag, points in expected.items():
            assert scalars[tag] == f32(points), tag
        assert scalars[f"{key}/test_p1"][0][1] == pytest.approx(row["p1"])


def wandb_records(path: Path):
    """The records of a wandb run file: a LevelDB-style log (32 KiB blocks of CRC, length, type, data) after a 7-byte
    header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield pb.Record.FromString(chunk)
            chunk = b""


def test_wandb_offline_run_holds_the_train_logs(tiny_causal_dir, fake_lama, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    proc = cli_in_process("train", "--model", tiny_causal_dir, "--data", fake_lama, "-r", ",".join(RELATIONS), *TRAIN,
                          "--out", tmp_path / "run", "--report-to", "wandb")
    assert proc.returncode == 0, proc.stderr
    (runfile,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing was sent
    records = list(wandb_records(runfile))
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.HasField("history")]
    got: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in row.items():
            series, _, key = tag.rpartition("/")
            if series and key != "step":
                got.setdefault(tag, []).append((row[f"{series}/step"], value))
    for rid in RELATIONS:
        for tag, points in expected_series(tmp_path / "run" / rid / "train_log.jsonl", rid).items():
            assert got[tag] == points, tag
    (run,) = [r.run for r in records if r.HasField("run")][:1]
    params = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert params["method"] == "ptuning" and params["train.eval_every"] == 2


def small_grid(tmp_path: Path, model) -> Path:
    grid = tmp_path / "g.toml"
    grid.write_text(f'model = "{model}"\nrelations = ["P19"]\n[axes]\nmethod = ["prompt-tuning"]\n')
    return grid


@pytest.mark.parametrize("given, fragment", [
    (["comet"], "--report-to 'comet': expected tensorboard, mlflow, wandb or none"),
    (["none", "mlflow"], "--report-to none cannot go with a tracker"),
])
def test_report_to_errors_are_one_line_and_make_nothing(given, fragment, tiny_causal_dir, fake_lama, tmp_path):
    args = [a for g in given for a in ("--report-to", g)]
    proc = cli_in_process("train", "--model", tiny_causal_dir, "--data", fake_lama, "-r", "P19", "--out",
                          tmp_path / "out", *args)
    assert_user_error(proc, fragment)
    proc = cli_in_process("sweep", small_grid(tmp_path, tiny_causal_dir), "--out", tmp_path / "sweep", "--data",
                          fake_lama, *args)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "sweep").exists()


def test_a_tracker_not_installed_says_what_to_install(tiny_causal_dir, fake_lama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: find_spec gives None
    proc = cli_in_process("train", "--model", tiny_causal_dir, "--data", fake_lama, "-r", "P19", "--out",
                          tmp_path / "out", "--report-to", "wandb")
    assert_user_error(proc, "--report-to wandb needs the wandb package", "pip install 'probe[wandb]'")
    proc = cli_in_process("sweep", small_grid(tmp_path, tiny_causal_dir), "--out", tmp_path / "sweep", "--data",
                          fake_lama, "--report-to", "wandb")
    assert_user_error(proc, "pip install 'probe[wandb]'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "sweep").exists()
