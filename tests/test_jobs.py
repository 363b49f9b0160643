"""Cells run at once on threads in one process (`--jobs`, probe.cells.run_beside): the same files as one after
another, cells that change the LM run alone, a failure or an interrupt loses no finished cell, and bad uses are
one-line errors."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from probe.cells import Cell, CellOutput, ModelSpec, Progress, run_beside
from tests.conftest import assert_user_error, cli_in_process

RELATIONS = ("P19", "P36", "P37")


def relation_files(run: Path) -> dict[str, bytes]:
    """Every file a run wrote per relation, by path (results.json and the run's config aside)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("P*/*"))}


@pytest.mark.parametrize("model", ["tiny_causal_dir", "tiny_masked_dir"])
def test_jobs_write_what_one_after_another_writes(request, model, fake_lama, tmp_path):
    """bfloat16 (the CLI default), one torch thread each way: three relations on two threads give every file,
    byte for byte, that they give one after another. One-thread CPU sums do not depend on what runs beside them,
    so nothing but the order of finishing may differ: exact equality, no tolerance."""
    base = ["train", "--model", request.getfixturevalue(model), "--data", fake_lama, "-r", ",".join(RELATIONS),
            "--epochs", "1", "--min-steps", "6", "--eval-every", "2", "--batch-size", "2", "--threads", "1"]
    alone = cli_in_process(*base, "--out", tmp_path / "alone")
    beside = cli_in_process(*base, "--jobs", "2", "--out", tmp_path / "beside")
    assert alone.returncode == 0 and beside.returncode == 0, (alone.stderr, beside.stderr)
    files = relation_files(tmp_path / "alone")
    assert len(files) == 5 * len(RELATIONS)  # config, metrics, predictions, prompt, train log
    assert relation_files(tmp_path / "beside") == files
    summary = json.loads((tmp_path / "beside" / "results.json").read_text())
    assert summary["config"]["torch_threads"] == 1
    assert [r["relation"] for r in summary["relations"]] == list(RELATIONS)


@dataclass
class Sleeper(Cell):
    """A cell that sleeps, notes when it ran, and writes its marker; one may raise at once instead."""

    key: str
    log: list = field(default_factory=list)
    root: Path = Path(".")
    alone: bool = False
    fails: bool = False
    seconds: float = 0.2
    model: ModelSpec = ModelSpec("m")
    marker: str = ""

    def __post_init__(self):
        self.marker = f"{self.key}.done"

    @property
    def beside_others(self) -> bool:
        return not self.alone

    def run(self, loaded) -> CellOutput:
        if self.fails:
            raise RuntimeError(f"{self.key} broke")
        start = time.monotonic()
        time.sleep(self.seconds)
        self.log.append((self.key, start, time.monotonic()))
        return CellOutput([(self.marker, b"ok")])


def sleepers(tmp_path: Path, *specs: str) -> list[Sleeper]:
    """Cells named by specs: 'a' runs beside others, 'a!' alone, 'a?' fails."""
    log: list = []
    return [Sleeper(s.rstrip("!?"), log, tmp_path, s.endswith("!"), s.endswith("?")) for s in specs]


def overlaps(log: list) -> set[tuple[str, str]]:
    return {(a[0], b[0]) for a in log for b in log if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]}


def test_cells_that_change_the_lm_run_alone(tmp_path):
    cells = sleepers(tmp_path, "a", "b", "c!", "d", "e")
    run_beside(cells, None, 2, Progress(cells))
    assert sorted(k for k, *_ in cells[0].log) == ["a", "b", "c", "d", "e"]
    assert overlaps(cells[0].log) == {("a", "b"), ("d", "e")}
    assert all((tmp_path / f"{k}.done").read_bytes() == b"ok" for k in "abcde")


def test_a_failed_cell_lets_the_running_ones_finish_and_starts_no_more(tmp_path):
    cells = sleepers(tmp_path, "a?", "b", "c")
    with pytest.raises(RuntimeError, match="a broke"):
        run_beside(cells, None, 2, Progress(cells))
    assert (tmp_path / "b.done").exists() and not (tmp_path / "a.done").exists()
    assert not (tmp_path / "c.done").exists()  # a failed at once, before a thread was free for c


def test_an_interrupt_writes_the_cells_already_finished(tmp_path):
    """Ctrl-C arrives while this thread writes the first cell: what the other thread finished meanwhile is written
    before the interrupt goes on; the cell still running is not."""
    cells = sleepers(tmp_path, "a", "b", "c")
    cells[1].seconds = 0.25  # b ends after a
    writes = []

    def on_done(cell, output):
        writes.append(cell.key)
        if len(writes) == 1:
            time.sleep(0.3)  # b finishes meanwhile
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_beside(cells, None, 2, Progress(cells), on_done)
    assert writes == ["a", "b"] and not (tmp_path / "c.done").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (("--jobs", "0"), "--jobs must be"),
    (("--jobs", "2", "--ray"), "--jobs applies in process"),
    (("--jobs", "2", "--method", "finetune"), "method 'finetune' changes the LM while it fits"),
    (("--jobs", "2", "--method", "prefix-tuning"), "method 'prefix-tuning' changes the LM while it fits"),
])
def test_bad_jobs_are_one_error_line_before_any_model_loads(extra, message, tmp_path, fake_lama):
    proc = cli_in_process("train", "-r", "P19", "--data", fake_lama, "--model", tmp_path / "no-model",
                          "--out", tmp_path / "run", *extra)
    assert_user_error(proc, message)
    assert not (tmp_path / "run").exists()


def test_a_sweep_on_threads_gives_the_cells_of_one_after_another(tiny_causal_dir, fake_lama, tmp_path):
    """prompt-tuning cells run two at once, prefix-tuning's (which hook the LM) alone: every cell's row is the one the
    sweep gives one cell after another, on one thread (its time aside)."""
    grid = tmp_path / "g.toml"
    grid.write_text(f"""
model = "{tiny_causal_dir}"
relations = ["P19", "P36", "P37"]
template = "(1, sub, obj)"
[axes]
method = ["prompt-tuning", "prefix-tuning"]
length = [1, 2]
init = ["random"]
reparam = ["none"]
seed = [1]
[train]
min_steps = 3
epochs = 1
batch_size = 2
""")
    rows = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        proc = cli_in_process("sweep", grid, "--out", out, "--data", fake_lama, "--threads", "1", "--jobs", jobs)
        assert proc.returncode == 0, proc.stderr
        rows[jobs] = {p.name: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
        for row in rows[jobs].values():
            row.pop("seconds", None)
    assert len(rows["1"]) == 2 * 2 * 3 and rows["2"] == rows["1"]
