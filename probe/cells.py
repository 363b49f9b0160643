"""Cells, the unit of work of eval, train and sweep, and the executors that run them.

A cell is one (model, relation, setting, seed). `cell.run(worker)` computes against a loaded model and returns
the files it made (`CellOutput`); the driver writes them under the cell's folder with atomic writes, the marker
file last. So a worker killed mid-cell leaves nothing behind, a finished cell is written once, and a rerun skips
every cell whose marker exists.

Two executors run cells behind one interface (`Executor`), with the same results:
- `InProcess`: one model at a time in this process, its cells one after another (the default), or with `jobs` > 1
  that many at once on threads against the one model (`run_beside`);
- `RayExecutor` (probe/ray_cells.py): Ray actors that each load a model once, on one machine or a cluster.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from probe.backends import Backend, load_backend
from probe.backends.loading import parse_max_memory, resolve_device
from probe.batching import relation_facts
from probe.data import Fact, FactData, Relation
from probe.errors import CellsFailed, ProbeError, SettingError
from probe.files import atomic_write_bytes, damaged
from probe.objects import RelationCandidates
from probe.vocab import CandidateChoice, CandidateVocab


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model: what each worker needs to load its own copy."""

    name: str
    device: str = "cpu"  # resolved: cpu, cuda or cuda:N
    dtype: str = "bfloat16"
    control: str = "none"
    seed: int = 0
    max_memory: str | None = None  # --max-memory: place the model over several devices (see load_backend)

    def load(self) -> Backend:
        return load_backend(self.name, device=self.device, dtype=self.dtype, control=self.control, seed=self.seed,
                            max_memory=parse_max_memory(self.max_memory))

    @classmethod
    def of(cls, backend: Backend, seed: int = 0) -> ModelSpec:
        """The spec of a model already loaded."""
        return cls(backend.name, str(backend.device), str(backend.dtype).removeprefix("torch."), backend.control, seed)


@dataclass
class CellOutput:
    """What a cell made: files relative to its folder, written in order (the last marks the cell finished)."""

    files: list[tuple[str, bytes]] = field(default_factory=list)
    message: str | None = None  # a line for the user once the files are written
    warnings: list[str] = field(default_factory=list)


class Cell(ABC):
    """One unit of work. Subclasses are plain dataclasses (they travel to Ray workers) with these attributes."""

    key: str  # unique within its folder
    model: ModelSpec
    root: Path  # the folder its files go to
    marker: str  # the file, relative to root, that says the cell is finished

    def done(self) -> bool:
        """Whether the cell's marker and the files it lists are there and whole (a damaged one runs again)."""
        return damaged(Path(self.root) / self.marker) is None

    def damaged(self) -> str | None:
        """Why a cell that was marked finished is not, or None (also for a cell never finished)."""
        marker = Path(self.root) / self.marker
        return damaged(marker) if marker.exists() else None

    @property
    def members(self) -> list[Cell]:
        """The cells this one computes: itself (a pack of cells computes several, see probe/pack.py)."""
        return [self]

    @property
    def beside_others(self) -> bool:
        """Whether the cell leaves the loaded LM as it is, so that other cells may run beside it (`run_beside`)."""
        return True

    @abstractmethod
    def run(self, loaded: LoadedModel) -> CellOutput:
        """Compute the cell against a loaded model; never write into the run folder."""

    def outputs(self, loaded: LoadedModel) -> Iterator[tuple[Cell, CellOutput]]:
        """Each member's output as it finishes (a cell: its own)."""
        yield self, self.run(loaded)


class LoadedModel:
    """What cells run against: one loaded model (its backend), the data, the candidates
    (`candidates.for_relation(rid)`), and facts filtered once."""

    def __init__(self, backend: Backend, data: FactData, candidates: CandidateVocab | RelationCandidates,
                 spec: ModelSpec | None = None):
        self.backend = backend
        self.data = data
        self.candidates = candidates
        self.spec = spec or ModelSpec.of(backend)
        self.remote = False  # on a Ray worker: logs go to scratch files, returned with the output
        self._facts: dict[tuple[str, str], tuple[list[Fact], int]] = {}
        self.memo: dict = {}  # what cells compute once per loaded model (a relation's manual figures, say)

    @classmethod
    def load(cls, spec: ModelSpec, data: FactData, candidates: CandidateChoice | str) -> LoadedModel:
        backend = spec.load()
        return cls(backend, data, CandidateChoice.of(candidates).build(backend.tokenizer, data), spec)

    def facts(self, relation: Relation, split: str, strict: bool = False) -> tuple[list[Fact], int]:
        """A split's facts whose object is a candidate, and how many were dropped; strict: none left is an error."""
        key = (relation.id, split)
        if key not in self._facts:
            self._facts[key] = relation_facts(self.data, relation, split, self.candidates, False)
        facts, dropped = self._facts[key]
        if not facts and strict:
            relation_facts(self.data, relation, split, self.candidates, True)  # raises the error
        return facts, dropped


def write_output(cell: Cell, output: CellOutput) -> None:
    """The driver's side: write a cell's files atomically, in order, the marker last."""
    for name, blob in output.files:
        atomic_write_bytes(Path(cell.root) / name, blob)


class Progress:
    """One progress bar over cells (done, running, failed) and a per-model summary table at the end."""

    def __init__(self, cells: Sequence[Cell], desc: str = "cells"):
        cells = [m for c in cells for m in c.members if not m.done()]  # a pack counts as its unfinished members
        self.counted = {id(c) for c in cells}
        self.bar = tqdm(total=len(cells), desc=desc, unit="cell", dynamic_ncols=True, disable=not cells)
        self.running = 0
        self.failed: list[tuple[Cell, str]] = []
        self.t0 = time.time()
        self.stats: dict[str, dict] = {}
        for c in cells:
            self.stats.setdefault(c.model.name, {"model": c.model.name, "cells": 0, "done": 0, "failed": 0, "cell_s": 0.0})
            self.stats[c.model.name]["cells"] += 1

    def started(self, n: int = 1) -> None:
        self.running += n
        self._show()

    def finished(self, cell: Cell, seconds: float, error: str | None = None) -> None:
        self.running -= 1
        row = self.stats[cell.model.name]
        if error is None:
            row["done"] += 1
            row["cell_s"] += seconds
        else:
            row["failed"] += 1
            self.failed.append((cell, error))
        self.bar.update(1)
        self._show()

    def skipped(self, cell: Cell) -> None:
        """A cell another process finished meanwhile: counted as done, with no time of its own."""
        if id(cell) in self.counted:
            self.started()
            self.finished(cell, 0.0)

    def _show(self) -> None:
        self.bar.set_postfix(running=self.running, failed=len(self.failed), refresh=False)

    def close(self) -> None:
        self.bar.close()

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame(self.stats.values())
        if not df.empty:
            df["cell_s"] = df["cell_s"].round(1)
        return df

    def report(self, log: Callable[[str], None]) -> None:
        """The summary table; failures raise CellsFailed once everything else is written."""
        if len(self.stats) > 1 or self.failed:
            log(self.table().to_string(index=False))
        log(f"{sum(r['done'] for r in self.stats.values())} cells in {time.time() - self.t0:.1f}s")
        if self.failed:
            for cell, why in self.failed:
                log(f"failed: {cell.key} ({cell.model.name}): {why}")
            raise CellsFailed(self.failed)


OnDone = Callable[[Cell, CellOutput], None]


def finish(cell: Cell, output: CellOutput, on_done: OnDone | None) -> None:
    """Write a finished cell, tell the user, and let the caller update its tables."""
    write_output(cell, output)
    for warning in output.warnings:
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    if output.message:
        tqdm.write(output.message)
    if on_done:
        on_done(cell, output)


def start(cell: Cell, progress: Progress) -> bool:
    """Count a cell as running; False if another process sharing its folder finished it meanwhile (its finished
    members are counted as skipped)."""
    for member in cell.members:
        if member.done():
            progress.skipped(member)
    if cell.done():
        return False
    progress.started(sum(not m.done() for m in cell.members))
    return True


def run_beside(cells: Sequence[Cell], loaded: LoadedModel, jobs: int, progress: Progress,
               on_done: OnDone | None = None) -> None:
    """Run cells against one loaded model, `jobs` at once on threads; a cell that changes the LM (not `beside_others`)
    runs alone. This thread writes what they make as it comes, so an interrupt loses no finished cell; a cell that
    fails lets the running ones finish and be written, then its error is raised."""
    made: queue.SimpleQueue = queue.SimpleQueue()  # (member, output, seconds); (None, error or None, 0) when a cell ends
    waiting, running, alone, failure = deque(cells), 0, False, None

    def work(cell: Cell) -> None:
        try:
            t0 = time.time()
            for member, output in cell.outputs(loaded):
                made.put((member, output, time.time() - t0))
                t0 = time.time()
            made.put((None, None, 0.0))
        except BaseException as error:  # raised again by the writing thread
            made.put((None, error, 0.0))

    def take(item: tuple) -> None:
        """A thread's item: a finished member, written; or a cell's end, which frees its thread."""
        nonlocal running, alone, failure
        member, output, seconds = item
        if member is None:
            running, alone, failure = running - 1, False, failure or output
            return
        finish(member, output, on_done)
        progress.finished(member, seconds)

    try:
        while waiting or running:
            while waiting and failure is None and running < jobs and not alone and (
                    not running or waiting[0].beside_others):
                cell = waiting.popleft()
                if start(cell, progress):
                    running, alone = running + 1, not cell.beside_others
                    threading.Thread(target=work, args=(cell,), name=f"probe {cell.key}", daemon=True).start()
            if not running:
                break
            take(made.get())
    except BaseException:  # interrupted: write what has finished (threads still running end with the process)
        while True:
            try:
                item = made.get_nowait()
            except queue.Empty:
                break
            if item[0] is not None:
                take(item)
        raise
    if failure is not None:
        raise failure


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `n` inside the block (None: left as it is), then put back."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Executor(ABC):
    """Where cells run. `local`: the models load in this process, so a device named must exist here."""

    local: bool = True

    @property
    @abstractmethod
    def device(self) -> str:
        """The device the models load on when none is named (auto: a GPU when there is one)."""

    @property
    @abstractmethod
    def threads(self) -> int:
        """torch's CPU threads in each process that computes (recorded: CPU sums depend on it)."""

    @abstractmethod
    def check_device(self, device: str) -> None:
        """A device that the workers cannot have is a ProbeError."""

    @abstractmethod
    def run(self, cells: Sequence[Cell], on_done: OnDone | None = None, desc: str = "cells") -> Progress:
        """Run the unfinished cells, writing each as it finishes; Progress reports them."""

    @abstractmethod
    def close(self) -> None:
        """Shut down what the executor started."""


class InProcess(Executor):
    """Runs cells in this process, loading each model once (or using one already loaded): one after another, or with
    `jobs` > 1 that many at once on threads (`run_beside`), torch's CPU threads shared among them."""

    def __init__(self, data: FactData, candidates: CandidateChoice | str | None = None, loaded: LoadedModel | None = None,
                 log=print, threads: int | None = None, jobs: int = 1):
        self.data = data
        self.candidates = candidates
        self.loaded = loaded
        self.log = log
        self._threads = threads
        self.jobs = jobs

    @property
    def device(self) -> str:
        return resolve_device("auto")

    @property
    def threads(self) -> int:
        return self._threads or max(1, torch.get_num_threads() // self.jobs)

    def check_device(self, device: str) -> None:
        resolved = resolve_device(device)
        if resolved != "cpu" and self.jobs > 1:
            raise SettingError(f"--jobs {self.jobs} applies to the CPU; on {resolved} use --pack, which trains many "
                               "prompts in one pass of the LM")

    def close(self) -> None:
        """Nothing to shut down."""

    def run(self, cells: Sequence[Cell], on_done: OnDone | None = None, desc: str = "cells") -> Progress:
        todo = [c for c in cells if not c.done()]
        progress = Progress(todo, desc)
        try:
            with torch_threads(self.threads):
                for spec in dict.fromkeys(c.model for c in todo):
                    loaded = self._load(spec)
                    mine = [c for c in todo if c.model == spec]
                    if self.jobs > 1:
                        run_beside(mine, loaded, self.jobs, progress, on_done)
                    else:
                        for cell in (c for c in mine if start(c, progress)):
                            t0 = time.time()
                            for member, output in cell.outputs(loaded):
                                finish(member, output, on_done)
                                progress.finished(member, time.time() - t0)
                                t0 = time.time()
                    loaded = None  # the next model loads once this one is freed
        finally:
            progress.close()
        return progress

    def _load(self, spec: ModelSpec) -> LoadedModel:
        if self.loaded is None or self.loaded.spec != spec:
            if self.candidates is None:
                raise ProbeError(f"internal: no candidates to build for {spec.name}")
            self.loaded = None  # free the previous model first (the caller holds no other reference)
            t0 = time.time()
            self.loaded = LoadedModel.load(spec, self.data, self.candidates)
            self.log(f"{spec.name} loaded in {time.time() - t0:.1f}s")
        return self.loaded
