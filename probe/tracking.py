"""`--report-to`: a run's training curves and figures in experiment trackers (TensorBoard, wandb, mlflow), as HF's
Trainer reports them.

One tracking run per probe run. The driver, the process that writes the run folder, reports each cell once its
files are written: its `train_log.jsonl` rows (loss, lr, dev figures at each check) as the series of the cell's key
(a relation for `probe train`, a setting, seed and relation for `probe sweep`), then its test figures from the file
that marks it finished. So fits on threads (--jobs) and on Ray workers are reported alike, each as it finishes.
A fit retried at a lower lr has its later attempts as series of their own, `<key>_attempt2`, ...

Nothing leaves the machine unless the tracker is configured to send it: TensorBoard writes event files in
`<run>/tensorboard`, mlflow a file store in `<run>/mlruns` unless MLFLOW_TRACKING_URI is set, wandb runs offline
unless WANDB_MODE is set; mlflow's usage telemetry and wandb's error reports are off unless their variables say so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from probe.cells import Cell, CellOutput, Executor, OnDone, Progress
from probe.errors import SettingError

FINAL = ("p1", "p10", "mrr")  # a finished cell's test figures, reported as test_p1, ...
ParamValue = str | int | float | bool


class Tracker(ABC):
    """One tracking run in one tracker: parameters once, then scalars by tag and step."""

    name: ClassVar[str]  # the --report-to name (HF's)
    module: ClassVar[str]  # the package it needs, installed by the extra probe[<name>]

    @abstractmethod
    def __init__(self, root: Path, run_name: str, params: dict[str, ParamValue]):
        """Open the tracking run of the run folder `root`, its parameters logged."""

    @abstractmethod
    def log(self, step: int, values: dict[str, float]) -> None:
        """Scalars by tag (`<series>/<metric>`) at a step of their series."""

    @abstractmethod
    def close(self) -> None:
        """End the tracking run."""


TRACKERS: dict[str, type[Tracker]] = {}


def tracker(cls: type[Tracker]) -> type[Tracker]:
    TRACKERS[cls.name] = cls
    return cls


@tracker
class TensorBoard(Tracker):
    """Event files in `<run>/tensorboard` (torch.utils.tensorboard); the parameters as hparams and as JSON text."""

    name, module = "tensorboard", "tensorboard"

    def __init__(self, root: Path, run_name: str, params: dict[str, ParamValue]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(root / "tensorboard"))
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2) + "\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


@tracker
class MLflow(Tracker):
    """A run of experiment $MLFLOW_EXPERIMENT_NAME (default `probe`) in $MLFLOW_TRACKING_URI, else a file store in
    `<run>/mlruns`."""

    name, module = "mlflow", "mlflow"

    def __init__(self, root: Path, run_name: str, params: dict[str, ParamValue]):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the file store, which mlflow 3.x keeps in maintenance and opens only when allowed
            uri = (root / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "probe"
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        items = [Param(k, str(v)[:500]) for k, v in params.items()]  # 500 characters: what every mlflow store takes
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@tracker
class Wandb(Tracker):
    """A run of project $WANDB_PROJECT (default `probe`) in `<run>/wandb`, offline unless $WANDB_MODE says otherwise;
    each series has its own step (`<series>/step`)."""

    name, module = "wandb", "wandb"

    def __init__(self, root: Path, run_name: str, params: dict[str, ParamValue]):
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        self.series: set[str] = set()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "probe", name=run_name, dir=str(root),
                              config=params, mode=os.environ.get("WANDB_MODE") or "offline")

    def log(self, step: int, values: dict[str, float]) -> None:
        by_series: dict[str, dict[str, float]] = {}
        for tag, value in values.items():
            by_series.setdefault(tag.rsplit("/", 1)[0], {})[tag] = value
        for series, mine in by_series.items():
            if series not in self.series:
                self.series.add(series)
                self.run.define_metric(f"{series}/step", hidden=True)
                self.run.define_metric(f"{series}/*", step_metric=f"{series}/step")
            self.run.log({f"{series}/step": step, **mine})

    def close(self) -> None:
        self.run.finish()


def check_report_to(names: Sequence[str] | None) -> list[str]:
    """The trackers named by --report-to (none: []); an unknown or uninstalled one is a ProbeError, raised before
    anything is made."""
    names = list(dict.fromkeys(n.strip().lower() for given in names or () for n in given.split(",") if n.strip()))
    if "none" in names:
        if len(names) > 1:
            raise SettingError("--report-to none cannot go with a tracker: give none, or the trackers")
        return []
    for name in names:
        if name not in TRACKERS:
            raise SettingError(f"--report-to {name!r}: expected {', '.join(TRACKERS)} or none")
        if importlib.util.find_spec(TRACKERS[name].module) is None:
            raise SettingError(f"--report-to {name} needs the {TRACKERS[name].module} package, which is not installed: "
                               f"pip install 'probe[{name}]'")
    return names


def flat_params(config: dict, prefix: str = "") -> dict[str, ParamValue]:
    """A nested config as `a.b` parameters: strings, numbers and booleans as they are, lists and nulls as JSON."""
    out: dict[str, ParamValue] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str | int | float | bool) else json.dumps(value)
    return out


def log_rows(rows: list[dict], series: str) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) of a train log's rows: every number but the step, an attempt after the first (its rows
    open with its `config`) as `<series>_attempt<n>`."""
    out, attempt = [], 0
    for row in rows:
        if "config" in row:
            attempt += 1
        name = series if attempt <= 1 else f"{series}_attempt{attempt}"
        values = {f"{name}/{k}": float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        if values:
            out.append((int(row["step"]), values))
    return out


class Reporting:
    """The trackers of one probe run, opened when its cells start (its folder made) and fed by the driver."""

    def __init__(self, names: list[str], root: Path, config: dict):
        self.names, self.root, self.config = names, Path(root), config
        self.trackers: list[Tracker] = []

    def open(self) -> None:
        if not self.trackers:
            params = flat_params(self.config)
            for name in self.names:
                self.trackers.append(TRACKERS[name](self.root, self.root.name, params))

    def cell_done(self, cell: Cell, output: CellOutput) -> None:
        """A written cell: its train log's rows, then its test figures at the log's last step."""
        files = dict(output.files)
        log = next((blob for name, blob in output.files if name.endswith("train_log.jsonl")), b"")
        points = log_rows([json.loads(line) for line in log.decode().splitlines() if line.strip()], cell.key)
        final = json.loads(files[cell.marker]) if cell.marker.endswith(".json") and cell.marker in files else {}
        tested = {f"{cell.key}/test_{k}": float(final[k]) for k in FINAL if isinstance(final.get(k), int | float)}
        if tested:
            points.append((points[-1][0] if points else 0, tested))
        for tracker in self.trackers:
            for step, values in points:
                tracker.log(step, values)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


class Reported(Executor):
    """An executor whose finished cells are also reported to the run's trackers (in the driver's thread)."""

    def __init__(self, inner: Executor, reporting: Reporting):
        self.inner, self.reporting = inner, reporting
        self.local = inner.local

    @property
    def device(self) -> str:
        return self.inner.device

    @property
    def threads(self) -> int:
        return self.inner.threads

    def check_device(self, device: str) -> None:
        self.inner.check_device(device)

    def run(self, cells: Sequence[Cell], on_done: OnDone | None = None, desc: str = "cells") -> Progress:
        self.reporting.open()

        def done(cell: Cell, output: CellOutput) -> None:
            self.reporting.cell_done(cell, output)
            if on_done:
                on_done(cell, output)

        return self.inner.run(cells, done, desc)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.reporting.close()


def reported(executor: Executor, names: list[str], root: Path, config: dict) -> Executor:
    """The executor, reporting to the trackers `names` (checked by `check_report_to`) as the run of folder `root`."""
    return Reported(executor, Reporting(names, root, config)) if names else executor
