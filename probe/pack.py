"""Packed fitting: many prompts of one method fit in one pass of the frozen LM.

`fit_pack` trains the tasks of a pack with at most `slots` of them at once: each step takes the next batch of every
task in a slot and runs them as one pass (`Backend.pack_loss`); each prompt keeps its own optimizer, lr schedule,
dev checks, patience, retry and log (`probe.trainer`), and since the LM is frozen and rows are independent, each gets
exactly its own gradient. A task that stops early leaves and the next one takes its slot. Methods fit another way
(fine-tuning) run one after another; AutoPrompt's searches run in step (`search_together`).

`Pack` is a cell made of fit cells (the relations of `probe train`, the cells of `probe sweep`): each member keeps
its key, files and marker, and is written as soon as it finishes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from probe.backends import Backend
from probe.cells import Cell, CellOutput, LoadedModel, ModelSpec
from probe.errors import ProbeError, SettingError
from probe.fit import FitTask, Fitted, fit

CPU_PACK = 1  # prompts trained at once on a CPU when --pack is not given (BENCHMARKS.md, "Packed fitting")
GPU_PACK = 64  # on a GPU, at most; fewer where its free memory says so (see memory_slots)
BYTES_PER_ROW_LAYER = 64  # activations a training row keeps per layer and hidden unit, in bytes: a generous bound


def default_pack(device: str) -> int:
    """Prompts per pack when --pack is not given: CPU_PACK on a CPU, where a pass costs about as much per row however
    many rows it has (a pack gains a tenth there, and its sums, so its figures, would depend on which relations share
    it: --pack N asks for it); GPU_PACK on a GPU, whose passes cost little more for more rows (memory_slots may
    train fewer at once)."""
    return GPU_PACK if device.startswith("cuda") else CPU_PACK


def memory_slots(backend: Backend, batch_size: int, tokens: int = 32) -> int | None:
    """On a GPU, how many prompts half its free memory holds for training, at `batch_size` rows of `tokens` positions
    each; None on a CPU (no limit)."""
    if backend.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(backend.device)
    per_prompt = batch_size * tokens * backend.model.config.num_hidden_layers * backend.hidden_size * BYTES_PER_ROW_LAYER
    return max(1, free // 2 // per_prompt)


def fit_pack(backend: Backend, tasks: Sequence[FitTask], slots: int) -> Iterator[tuple[int, Fitted]]:
    """Fit every task, at most `slots` at once (the method's `fit_together`), each new one taking the slot of one that
    finished; yields (index of the task, its Fitted) as each finishes. Tasks of a method whose fits cannot share a
    pass run one after another."""
    if slots < 1:
        raise SettingError(f"--pack must be at least 1, got {slots}")
    if len({t.method for t in tasks}) > 1:
        raise ProbeError("internal: a pack holds the fits of one method")
    if not tasks or not tasks[0].method.packable or slots == 1:
        for i, task in enumerate(tasks):
            yield i, fit(backend, task)
        return
    yield from tasks[0].method.fit_together(backend, tasks, slots)


@dataclass
class Pack(Cell):
    """Fit cells of one model and method, fit together (`fit_pack`), all at once (fewer if a GPU's memory says so). A
    member is a cell with `prepare(loaded)` (its FitTask and what testing needs, or a CellOutput when it is skipped)
    and `finish(loaded, prepared, fitted)`."""

    cells: list

    @property
    def key(self) -> str:
        return f"{self.cells[0].key}+{len(self.cells) - 1}" if len(self.cells) > 1 else self.cells[0].key

    @property
    def model(self) -> ModelSpec:
        return self.cells[0].model

    @property
    def root(self) -> Path:
        return self.cells[0].root

    @property
    def marker(self) -> str:
        return self.cells[-1].marker

    @property
    def members(self) -> list[Cell]:
        return list(self.cells)

    @property
    def beside_others(self) -> bool:
        return all(c.beside_others for c in self.cells)

    def done(self) -> bool:
        return all(c.done() for c in self.cells)

    def run(self, loaded: LoadedModel) -> CellOutput:
        return CellOutput([f for _, out in self.outputs(loaded) for f in out.files])

    def outputs(self, loaded: LoadedModel) -> Iterator[tuple[Cell, CellOutput]]:
        prepared = []
        for cell in (c for c in self.cells if not c.done()):
            ready = cell.prepare(loaded)
            if isinstance(ready, CellOutput):
                yield cell, ready
            else:
                prepared.append((cell, ready))
        if not prepared:
            return
        tasks = [ready.task for _, ready in prepared]
        slots = min(len(tasks), memory_slots(loaded.backend, getattr(tasks[0].config, "batch_size", 16)) or len(tasks))
        for i, fitted in fit_pack(loaded.backend, tasks, slots):
            cell, ready = prepared[i]
            yield cell, cell.finish(loaded, ready, fitted)


def packed(cells: Sequence, size: int) -> list:
    """Fit cells as packs of `size`: those of one model and method, in order, `size` at a time (1: every cell on its
    own). The packs are the same whatever runs them, so a run in process and one on Ray compute the same sums."""
    if size == 1:
        return list(cells)
    by_kind: dict[tuple, list] = {}
    for cell in cells:
        by_kind.setdefault((cell.model, cell.method), []).append(cell)
    return [Pack(members[i : i + size]) for members in by_kind.values() for i in range(0, len(members), size)]
