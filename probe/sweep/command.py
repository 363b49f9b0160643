"""`probe sweep GRID`: check the grid and its models, make or reuse the sweep folder, run the unfinished cells (here,
on threads, or on Ray), then write the tables."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from probe.backends import model_info
from probe.cells import Executor, ModelSpec
from probe.data import open_data
from probe.errors import Interrupted, RunFolderError
from probe.files import atomic_write_json, read_json
from probe.options import check_pack, load_template_spec, make_executor
from probe.pack import default_pack, packed
from probe.runs import RECORDED_LATER, FolderLock, check_own_folder
from probe.sweep.cell import cells_of
from probe.sweep.grid import SHARED_KEYS, SweepGrid, grid_models, load_grid
from probe.sweep.tables import write_tables
from probe.tracking import check_report_to, reported


def prepare_folder(out: Path, grid: SweepGrid, extra: dict) -> FolderLock:
    """Create OUT or check that it was made by a grid with the same shared settings (so its cells can be reused);
    the folder stays locked for this sweep until the lock returned is released."""
    check_own_folder(out, "grid.json")
    record = {**grid.shared(), **extra, "axes": grid.axes, "relations": grid.relations}
    path = out / "grid.json"
    if path.exists():
        old = read_json(path)
        diff = [k for k in (*SHARED_KEYS, *extra) if old.get(k) != record.get(k) and (k in old or k not in RECORDED_LATER)]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} there, {record.get(k)!r} now" for k in diff)
            raise RunFolderError(f"sweep folder {out} was made with other settings ({shown}): use another --out")
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)
    (out / "cells").mkdir(exist_ok=True)
    atomic_write_json(path, record)
    return lock


def run_sweep(grid: SweepGrid, relation_ids: list[str], out: Path, executor: Executor,
              specs: dict[str, ModelSpec], pack: int = 1) -> pd.DataFrame:
    """Run every unfinished cell on the executor (its workers loading models as `specs` say), cells of one model and
    method `pack` at a time in one pass (probe/pack.py), then write the tables; returns the cells table."""
    cells = cells_of(grid, relation_ids, out, specs)
    todo = packed([c for c in cells if not c.done()], pack)
    left = sum(len(c.members) for c in todo)
    if left < len(cells):
        tqdm.write(f"{len(cells) - left} of {len(cells)} cells already done in {out}; running the other {left}",
                   file=sys.stderr)
    try:
        progress = executor.run(todo, desc="sweep")
    finally:
        df = write_tables(out, cells)
    progress.report(lambda m: tqdm.write(m, file=sys.stderr))
    return df


def executor_specs(grid: SweepGrid, executor: Executor, device: str | None = None) -> dict[str, ModelSpec]:
    """How the executor's workers load each model of the grid (auto: a GPU where the workers have one)."""
    device = executor.device if device in (None, "auto") else device
    return {m: ModelSpec(m, device, grid.dtype, grid.control) for m in grid_models(grid)}


def sweep_command(grid_path: Path, out: Path | None, data: str | None, device: str | None = None, log=print,
                  ray: str | None = None, cpus_per_worker: int | None = None, threads: int | None = None,
                  pack: int | None = None, jobs: int | None = None, report_to: list[str] | None = None) -> Path:
    """`probe sweep`: check the grid and its models, run the unfinished cells (here or on Ray); returns OUT/summary.md."""
    t0 = time.time()
    spec = load_grid(grid_path)
    trackers = check_report_to(report_to)
    if out is not None:
        check_own_folder(out, "grid.json")
    lama = open_data(data)
    ids = list(lama.relations) if spec.relations == "all" else [lama.relation(r).id for r in spec.relations]
    load_template_spec(spec.template)  # a bad template fails before any model loads
    out = out or Path("runs") / f"sweep-{Path(grid_path).stem}"
    lama.vocab_words(spec.vocab)  # checks the vocabulary name
    check_pack(pack)
    executor = make_executor(lama, spec.vocab, ray, cpus_per_worker, threads, log, jobs)
    lock = None
    try:
        specs = executor_specs(spec, executor, device)
        pack = pack or default_pack(next(iter(specs.values())).device)
        for s in specs.values():  # every model's config and tokenizer can be read before any cell runs
            executor.check_device(s.device)
            model_info(s.name, s.device, s.dtype, s.control, check_device=executor.local)
        lock = prepare_folder(out, spec, {"data": str(lama.root.resolve()), "torch_threads": executor.threads, "pack": pack})
        executor = reported(executor, trackers, out, read_json(out / "grid.json"))
        cells = cells_of(spec, ids, out, specs)
        log(f"{len(cells)} cells ({len(specs)} model(s) x {len(cells) // len(specs) // len(ids)} settings x {len(ids)} "
            "relations)")
        run_sweep(spec, ids, out, executor, specs, pack)
    except KeyboardInterrupt:
        raise Interrupted(out) from None
    finally:
        executor.close()
        if lock is not None:
            lock.release()
    log(f"{time.time() - t0:.0f}s in all")
    return out / "summary.md"
