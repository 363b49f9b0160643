"""A sweep cell: one setting of every axis for one relation and one model, fit and tested by the one fit cell
(probe/commands/fit_cell.py) as `probe train` fits a relation; its row is its one file, cells/KEY.json."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from probe.cells import Cell, CellOutput, LoadedModel, ModelSpec
from probe.commands.fit_cell import Prepared, finish_fit, prepare_fit
from probe.fit import Fitted, config_fields, fit
from probe.methods import get_method
from probe.runs import slug
from probe.spec import FitSpec, resolve_fit
from probe.sweep.grid import NOT_APPLICABLE, SweepGrid, expand_settings, grid_models
from probe.templates import spread_virtual


@dataclass
class SweepCell(Cell):
    """One training: a setting of every axis, for one relation and one model."""

    method: str
    length: int
    options: dict[str, str]  # every option a grid may vary, in order: the method's value, or "-" where it takes none
    seed: int
    relation: str
    model: ModelSpec
    root: Path
    grid: SweepGrid
    with_model: bool = False  # the grid has a model axis: the model is part of the key

    @property
    def key(self) -> str:
        head = f"{slug(self.model.name)}_" if self.with_model else ""
        values = "_".join(str(v) for v in self.options.values())
        return f"{head}{self.method}_L{self.length}_{values}_s{self.seed}_{self.relation}"

    @property
    def marker(self) -> str:
        return f"cells/{self.key}.json"

    @property
    def beside_others(self) -> bool:
        return get_method(self.method).beside_others

    @property
    def fit_spec(self) -> FitSpec:
        """The cell's fit, resolved by the one function `probe train`'s flags and `probe.train`'s keywords go through:
        the grid's [train] settings of its method, its options, its seed, the grid's template and fallback."""
        method_cls = get_method(self.method)
        train = {k: v for k, v in self.grid.train.items() if k in config_fields(method_cls.fit_config_class)}
        options = {k: v for k, v in self.options.items() if v != NOT_APPLICABLE}
        return resolve_fit(self.method, {**train, **options, "seed": self.seed}, template=self.grid.template,
                           template_given=self.grid.template is not None or bool(self.grid.axes.get("length")),
                           fallback=self.grid.fallback)

    def settings(self) -> dict:
        return {"model": self.model.name, "method": self.method, "length": self.length, **self.options,
                "seed": self.seed, "relation": self.relation}

    def prepare(self, loaded: LoadedModel) -> Prepared | CellOutput:
        """The cell's fit task and what testing it needs (see probe/pack.py); a CellOutput when it is skipped."""
        return prepare_cell(loaded, self, self.grid)

    def finish(self, loaded: LoadedModel, prepared: Prepared, fitted: Fitted) -> CellOutput:
        """Test the fitted prompt; the cell's row as its one file."""
        return finish_cell(loaded, self, prepared, fitted)

    def run(self, loaded: LoadedModel) -> CellOutput:
        done = run_cell(loaded, self, self.grid)
        return done if isinstance(done, CellOutput) else row_output(self, done)


def row_output(cell: SweepCell, row: dict, warnings: list[str] | None = None,
               log: bytes | None = None) -> CellOutput:
    """A finished cell's files: its train log (cells/KEY.train_log.jsonl, what --report-to reports), then its row,
    cells/KEY.json (its marker), with what its fit warned about."""
    files = [(f"cells/{cell.key}.train_log.jsonl", log)] if log is not None else []
    return CellOutput([*files, (cell.marker, (json.dumps(row, indent=2, ensure_ascii=False) + "\n").encode())],
                      warnings=list(warnings or []))


def cells_of(grid: SweepGrid, relation_ids: list[str], out: Path = Path("."),
             specs: dict[str, ModelSpec] | None = None) -> list[SweepCell]:
    """Every cell of the grid: models x settings x relations, each model loaded as `specs` says."""
    specs = specs or {m: ModelSpec(m, dtype=grid.dtype, control=grid.control) for m in grid_models(grid)}
    return [SweepCell(**s, relation=r, model=specs[m], root=out, grid=grid, with_model="model" in grid.axes)
            for m in grid_models(grid) for s in expand_settings(grid) for r in relation_ids]


def cell_template(loaded: LoadedModel, cell: SweepCell, spec: FitSpec):
    """The cell's template for its relation: the grid's (or the method's default shape), spread to the cell's length."""
    backend, relation = loaded.backend, loaded.data.relation(cell.relation)
    template = spec.templates.template_for(relation.id, backend.kind)
    if cell.length:
        template = spread_virtual(template, cell.length)
    return spec.method_class.relation_template(template, relation.template, backend.kind, spec.config)


def prepare_cell(loaded: LoadedModel, cell: SweepCell, grid: SweepGrid) -> Prepared | CellOutput:
    """A cell's fit task and what testing it needs: the one fit cell's, with the cell's FitSpec."""
    spec = cell.fit_spec
    return prepare_fit(loaded, cell.relation, cell_template(loaded, cell, spec), cell.method, spec.config,
                       spec.fit_config, loaded.data.split_name(grid.split), strict=True, desc=cell.key,
                       log_dir=Path(cell.root) / "cells", log_name=f"{cell.key}.train_log.jsonl")


ROW_METRICS = ("fit_failed", "below_manual", "kept")  # what a sweep row repeats of a relation's metrics besides figures


def finish_cell(loaded: LoadedModel, cell: SweepCell, prepared: Prepared, fitted: Fitted) -> CellOutput:
    """Test a cell's fitted prompt (the one fit cell's test, with the grid's fallback); its row (settings; test, dev
    and manual metrics; the flags; steps; seconds) as its one file."""
    tested = finish_fit(loaded, prepared, fitted, fallback=cell.grid.fallback)
    m, relation = tested.metrics, loaded.data.relation(cell.relation)
    figures = {k: v for k, v in m.items() if k in tested.evaluation.metrics or k.startswith(("dev_", "manual_", "trained_"))}
    row = {
        **cell.settings(), "template": m["template"], "type": relation.type, "n_facts": m["n_facts"],
        "n_train": tested.config["n_train"], **figures, "steps": fitted.result.steps,
        "best_step": fitted.result.best_step, **{k: m[k] for k in ROW_METRICS if k in m},
        "seconds": round(time.time() - prepared.t0, 1),
    }
    log = next((blob for name, blob in tested.files if name == "train_log.jsonl"), None)
    return row_output(cell, row, tested.warnings, log)


def run_cell(loaded: LoadedModel, cell: SweepCell, grid: SweepGrid) -> CellOutput:
    """Fit and test one cell alone: its row as its one file (no file when it is skipped)."""
    prepared = prepare_cell(loaded, cell, grid)
    if isinstance(prepared, CellOutput):
        return prepared
    return finish_cell(loaded, cell, prepared, fit(loaded.backend, prepared.task))
