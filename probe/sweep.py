"""`probe sweep`: train a grid of prompt settings over relations and seeds, one resumable cell at a time.

A grid file (TOML) names the axes; every combination is one cell, trained and tested on its own:

    model = "smollm2"
    relations = ["P19", "P36"]          # or "all"
    [axes]
    model = ["smollm2", "other.gguf"]   # optional: several models (replaces `model` above)
    method = ["prefix-tuning"]
    length = [1, 3, 6, 12]              # virtual tokens in all, spread over the template's slots
    init = ["random", "vocab"]          # a method option: for the methods that take it (prompt-tuning, prefix-tuning)
    reparam = ["mlp", "none"]           # a method option (prefix-tuning)
    seed = [1, 2, 3]
    [train]                             # fit settings of the methods (e.g. TrainConfig's max_train = 200)

Besides model, method, length and seed, an axis is any option a method of the grid declares (probe/methods); an
option value a method does not take is left out of that method's cells ("-" in the tables).

    OUT/grid.json         the grid as read, with the settings every cell shares
    OUT/cells/KEY.json    one finished cell: its settings and test/dev metrics (a cell is skipped once this exists,
                          so several processes can share a folder, e.g. one per grid file listing the axes in another order)
    OUT/cells/KEY.train_log.jsonl  the cell's fit, as a run's RELATION/train_log.jsonl (what --report-to reports)

`probe sweep GRID --ray` runs the cells on Ray (probe/ray_cells.py) instead of one after another here.
    OUT/cells.csv         one row per cell
    OUT/summary.csv|.md   per setting: macro P@1 over relations, mean and std over seeds
    OUT/length.png|.csv   macro P@1 against prompt length (log axis), a line per method and options with a band of ± one
                          std over seeds, the manual prompt (and run folders put in OUT) as horizontal lines
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from tqdm import tqdm

from probe.backends import model_info
from probe.cells import Cell, CellOutput, Executor, LoadedModel, ModelSpec
from probe.compare import mean_std, run_label
from probe.data import open_data
from probe.errors import Interrupted, ProbeError
from probe.evaluate import evaluate_facts
from probe.files import atomic_write_json, atomic_write_text, check_output_path, read_json, read_text
from probe.fit import FitTask, Fitted, config_fields, fit
from probe.methods import get_method, method_config, option_names
from probe.options import check_pack, load_template_spec, make_executor
from probe.pack import default_pack, packed
from probe.plots import length_points, plot_lengths
from probe.runs import RECORDED_LATER, markdown_table, slug
from probe.templates import compile_template, spread_virtual
from probe.tracking import check_report_to, reported

OPTIONS = tuple(option_names())  # the method options a grid may vary (init, reparam, ...), in the methods' order
AXES = ("model", "method", "length", *OPTIONS, "seed")
SETTING = ("model", "method", "length", *OPTIONS)  # what a summary row is; seeds and relations are averaged
SHARED_KEYS = ("model", "template", "split", "vocab", "dtype", "control", "train")  # must agree to resume a folder
NOT_APPLICABLE = "-"


@dataclass
class SweepGrid:
    """A sweep grid file, validated."""

    relations: list[str] | str
    axes: dict[str, list]
    model: str = "smollm2"
    template: str | None = None
    split: str | None = None  # the data's test split (test_34k for LAMA)
    vocab: str = "common"
    dtype: str = "bfloat16"
    control: str = "none"
    train: dict = field(default_factory=dict)

    def shared(self) -> dict:
        return {k: getattr(self, k) for k in SHARED_KEYS}


@dataclass
class SweepCell(Cell):
    """One training: a setting of every axis, for one relation and one model."""

    method: str
    length: int
    options: dict[str, str]  # every option of OPTIONS: the method's value, or "-" where it takes none
    seed: int
    relation: str
    model: ModelSpec
    root: Path
    grid: SweepGrid
    with_model: bool = False  # the grid has a model axis: the model is part of the key

    @property
    def key(self) -> str:
        head = f"{slug(self.model.name)}_" if self.with_model else ""
        values = "_".join(str(self.options[o]) for o in OPTIONS)
        return f"{head}{self.method}_L{self.length}_{values}_s{self.seed}_{self.relation}"

    @property
    def marker(self) -> str:
        return f"cells/{self.key}.json"

    @property
    def beside_others(self) -> bool:
        return get_method(self.method).beside_others

    def settings(self) -> dict:
        return {"model": self.model.name, "method": self.method, "length": self.length, **self.options,
                "seed": self.seed, "relation": self.relation}

    def prepare(self, loaded: LoadedModel) -> Ready:
        """The cell's fit task, its test facts, template and start time (see probe/pack.py)."""
        return prepare_cell(loaded, self, self.grid)

    def finish(self, loaded: LoadedModel, prepared: Ready, fitted: Fitted) -> CellOutput:
        """Test the fitted prompt; the cell's train log and its row (the marker)."""
        return self.output(loaded, finish_cell(loaded, self, prepared, fitted))

    def run(self, loaded: LoadedModel) -> CellOutput:
        return self.output(loaded, run_cell(loaded, self, self.grid))

    def log_path(self, loaded: LoadedModel, fresh: bool = False) -> Path:
        return loaded.log_path(Path(self.root) / "cells", f"{self.key}.train_log.jsonl", fresh)

    def output(self, loaded: LoadedModel, row: dict) -> CellOutput:
        """Its train log (a scratch one removed once read), then its row, which marks it done."""
        log = self.log_path(loaded)
        files = [(f"cells/{log.name}", log.read_bytes())] if log.exists() else []
        if loaded.remote:
            log.unlink(missing_ok=True)
        return CellOutput([*files, (self.marker, (json.dumps(row, indent=2, ensure_ascii=False) + "\n").encode())])


def load_grid(path: str | Path) -> SweepGrid:
    """Read and check a grid file; any problem is a ProbeError naming the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"sweep grid {path} not found")
    try:
        raw = tomllib.loads(read_text(path, "sweep grid", "a TOML grid file"))
    except tomllib.TOMLDecodeError as e:
        raise ProbeError(f"{path}: not a valid TOML grid ({e})") from None
    known = {f.name for f in dataclasses.fields(SweepGrid)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ProbeError(f"{path}: unknown key {unknown[0]!r}: expected {', '.join(sorted(known))}")
    if "relations" not in raw or "axes" not in raw:
        raise ProbeError(f"{path}: a grid needs `relations` (a list of ids or \"all\") and an [axes] table")
    axes = raw["axes"]
    if not isinstance(axes, dict) or "method" not in axes:
        raise ProbeError(f"{path}: [axes] must be a table with at least `method`")
    for name, values in axes.items():
        if name not in AXES:
            raise ProbeError(f"{path}: unknown axis {name!r}: expected one of {', '.join(AXES)}")
        if not isinstance(values, list) or not values:
            raise ProbeError(f"{path}: axis {name!r} must be a non-empty list, got {values!r}")
    bad = [m for m in axes.get("model", []) if not isinstance(m, str) or not m]
    if bad:
        raise ProbeError(f"{path}: axis 'model' takes model names or paths, got {bad[0]!r}")
    keys = [slug(m) for m in axes.get("model", [])]
    if len(set(keys)) < len(keys):
        raise ProbeError(f"{path}: axis 'model' has two models named {next(k for k in keys if keys.count(k) > 1)!r}: "
                         "their cells would share keys; copy or link one under another name")
    for name in ("length", "seed"):
        bad = [v for v in axes.get(name, []) if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "length" else 0)]
        if bad:
            raise ProbeError(f"{path}: axis {name!r} takes whole numbers{' >= 1' if name == 'length' else ''}, got {bad[0]!r}")
    grid = SweepGrid(**raw)
    if not (grid.relations == "all" or (isinstance(grid.relations, list) and grid.relations)):
        raise ProbeError(f"{path}: relations must be \"all\" or a non-empty list of ids, got {grid.relations!r}")
    expand_settings(grid, path)  # every axis value must exist for some method
    methods = [get_method(m) for m in grid.axes["method"]]
    if grid.dtype != "float32" and any(m.trains_lm for m in methods):
        raise ProbeError(f"{path}: {', '.join(m.name for m in methods if m.trains_lm)} trains the LM's weights, in float32: "
                         f"set dtype = \"float32\" (the grid has {grid.dtype!r})")
    fields = set().union(*(config_fields(m.fit_config_class) for m in methods)) - {"seed"}
    if not isinstance(grid.train, dict) or set(grid.train) - fields:
        bad = sorted(set(grid.train) - fields) if isinstance(grid.train, dict) else grid.train
        raise ProbeError(f"{path}: [train] takes {', '.join(sorted(fields))} for these methods; got {bad!r}")
    for m in methods:  # each method's fit settings, checked now rather than in the first cell
        train = {k: v for k, v in grid.train.items() if k in config_fields(m.fit_config_class)}
        try:
            m.fit_config(**train)
        except (ProbeError, TypeError) as e:
            raise ProbeError(f"{path}: [train] for {m.name}: {e}") from None
    return grid


def expand_settings(grid: SweepGrid, source: str | Path = "grid") -> list[dict]:
    """Every distinct (method, length, options, seed) of the grid; options a method lacks become '-'."""
    axes = grid.axes
    settings = []
    for name in axes["method"]:
        try:
            cls = get_method(name)
        except ProbeError as e:
            raise ProbeError(f"{source}: {e}") from None
        if not cls.can_fit():
            raise ProbeError(f"{source}: method {name!r} has nothing to train, so nothing to sweep")
    takes = {m: [f.name for f in get_method(m).config_class.options()] for m in axes["method"]}
    for option in OPTIONS:
        for value in axes.get(option, []):
            takers = [m for m in axes["method"] if option in takes[m]]
            if not takers:
                raise ProbeError(f"{source}: axis {option!r} applies to none of the methods {axes['method']}")
            for m in takers:
                try:
                    method_config(m, **{option: value})
                except ProbeError as e:
                    raise ProbeError(f"{source}: axis {option} value {value!r} does not exist for {m}: {e}") from None
    for m in axes["method"]:
        choices = [axes.get(o, [None]) if o in takes[m] else [None] for o in OPTIONS]
        for length, *values, seed in itertools.product(axes.get("length", [0]), *choices, axes.get("seed", [13])):
            config = method_config(m, **dict(zip(OPTIONS, values, strict=True)))  # fills in the method's defaults
            try:
                get_method(m).check_settings(config, grid.template is not None or bool(axes.get("length")))
            except ProbeError as e:
                raise ProbeError(f"{source}: {m}: {e} (a sweep's template and length axis count as a template)") from None
            options = {o: getattr(config, o) if o in takes[m] else NOT_APPLICABLE for o in OPTIONS}
            settings.append({"method": m, "length": length, "options": options, "seed": seed})
    return list({(s["method"], s["length"], *s["options"].values(), s["seed"]): s for s in settings}.values())


def grid_models(grid: SweepGrid) -> list[str]:
    """The models of a grid: its model axis, else its `model`."""
    return list(dict.fromkeys(grid.axes.get("model", [grid.model])))


def cells_of(grid: SweepGrid, relation_ids: list[str], out: Path = Path("."),
             specs: dict[str, ModelSpec] | None = None) -> list[SweepCell]:
    """Every cell of the grid: models x settings x relations, each model loaded as `specs` says."""
    specs = specs or {m: ModelSpec(m, dtype=grid.dtype, control=grid.control) for m in grid_models(grid)}
    return [SweepCell(**s, relation=r, model=specs[m], root=out, grid=grid, with_model="model" in grid.axes)
            for m in grid_models(grid) for s in expand_settings(grid) for r in relation_ids]


def prepare_folder(out: Path, grid: SweepGrid, extra: dict) -> None:
    """Create OUT or check that it was made by a grid with the same shared settings (so its cells can be reused)."""
    record = {**grid.shared(), **extra, "axes": grid.axes, "relations": grid.relations}
    path = out / "grid.json"
    if path.exists():
        old = read_json(path)
        diff = [k for k in (*SHARED_KEYS, *extra) if old.get(k) != record.get(k) and (k in old or k not in RECORDED_LATER)]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} there, {record.get(k)!r} now" for k in diff)
            raise ProbeError(f"sweep folder {out} was made with other settings ({shown}): use another --out")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


class Ready(NamedTuple):
    """A cell ready to fit: its task, its test facts, its template and when it started."""

    task: FitTask
    test: list
    template: object
    t0: float


def prepare_cell(loaded: LoadedModel, cell: SweepCell, grid: SweepGrid) -> Ready:
    """A cell's fit task and what testing it needs."""
    t0 = time.time()
    backend, data = loaded.backend, loaded.data
    relation = data.relation(cell.relation)
    candidates = loaded.candidates.for_relation(relation.id)
    method_cls = get_method(cell.method)
    config = method_config(cell.method, **{k: v for k, v in cell.options.items() if v != NOT_APPLICABLE})
    template = load_template_spec(grid.template, cell.method).template_for(relation.id, backend.kind)
    if cell.length:
        template = spread_virtual(template, cell.length)
    template = method_cls.relation_template(template, relation.template, backend.kind, config)
    compiled = compile_template(template, backend.tokenizer, backend.kind, manual=relation.template)
    method_cls.check_template(compiled)
    fit_config = method_cls.fit_config(**{k: v for k, v in grid.train.items() if k in config_fields(method_cls.fit_config_class)},
                                       seed=cell.seed)
    split = data.split_name(grid.split)
    train, dev, test = (loaded.facts(relation, s)[0] for s in ("train", "dev", split))
    if not train or not test:
        raise ProbeError(f"relation {relation.id} has no train or {split} facts left after filtering")
    task = FitTask(compiled, train, dev or train, candidates, fit_config, method_cls, config, relation.template,
                   cell.log_path(loaded, fresh=True), desc=cell.key, relation=relation.id)
    return Ready(task, test, template, t0)


def finish_cell(loaded: LoadedModel, cell: SweepCell, prepared: Ready, fitted: Fitted) -> dict:
    """Test a cell's fitted prompt; its row (settings, test and dev metrics, steps, seconds)."""
    task, test, template, t0 = prepared
    try:
        metrics = evaluate_facts(loaded.backend, fitted.prompt, task.compiled, test, task.candidates).metrics
    finally:
        fitted.prompt.release()
    result = fitted.result
    relation = loaded.data.relation(cell.relation)
    key = ("manual", relation.id, len(test))  # the manual prompt on the same test facts: once per relation
    if key not in loaded.memo:
        manual = compile_template(relation.template, loaded.backend.tokenizer, loaded.backend.kind)
        loaded.memo[key] = evaluate_facts(loaded.backend, None, manual, test, task.candidates).metrics["p1"]
    return {
        **cell.settings(), "template": template.source, "type": relation.type,
        "n_facts": len(test), "n_train": len(task.train), **metrics, **{f"dev_{k}": v for k, v in result.best_dev.items()},
        "steps": result.steps, "best_step": result.best_step, "manual_p1": loaded.memo[key],
        "seconds": round(time.time() - t0, 1),
    }


def run_cell(loaded: LoadedModel, cell: SweepCell, grid: SweepGrid) -> dict:
    """Train and test one cell alone; returns its row."""
    prepared = prepare_cell(loaded, cell, grid)
    return finish_cell(loaded, cell, prepared, fit(loaded.backend, prepared.task))


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


def write_tables(out: Path, cells: list[Cell]) -> pd.DataFrame:
    """cells.csv, summary.csv, summary.md, and length.png with the points it draws in length.csv, from the finished cells
    of this grid; run folders inside the sweep folder (a fine-tuning run, say) are drawn as reference lines."""
    df = pd.DataFrame([read_json(p) for c in cells if (p := out / "cells" / f"{c.key}.json").exists()])
    if not df.empty:
        write_summary(out, df)
    return df


def write_summary(out: Path, df: pd.DataFrame) -> None:
    """The tables and the length figure of `write_tables` from a cells table (rows of cells/*.json or cells.csv)."""
    df.to_csv(out / "cells.csv", index=False)
    summary = summarise(df)
    summary.to_csv(out / "summary.csv", index=False)
    shown = summary.copy()
    for m in ("p1", "dev_p1"):
        shown[m] = [mean_std(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"], strict=True)]
    shown = shown[[*(c for c in SETTING if c in shown), "seeds", "relations", "p1", "dev_p1"]].rename(
        columns={"p1": "macro P@1 (mean ± std over seeds)", "dev_p1": "dev macro P@1"})
    atomic_write_text(out / "summary.md", markdown_table(shown) + "\n")
    draw_lengths(df, summary, out, reference_runs(out))


def reference_runs(folder: Path) -> dict[str, dict[str, float]]:
    """Run folders inside `folder` (a fine-tuning run put there, say): their label and P@1 per relation."""
    out = {}
    for results in sorted(Path(folder).glob("*/results.json")):
        loaded = read_json(results)
        if isinstance(loaded, dict) and "config" in loaded:
            out[run_label(loaded["config"])] = {r["relation"]: r["p1"] for r in loaded.get("relations", [])}
    return out


def draw_lengths(cells: pd.DataFrame, summary: pd.DataFrame, out: Path, runs: dict[str, dict[str, float]],
                 name: str = "length") -> None:
    """OUT/<name>.png, macro P@1 against prompt length, and OUT/<name>.csv, its points and reference lines: the manual
    prompt's macro P@1 over the cells' relations, and each run of `runs` over those relations."""
    points = length_points(summary, list(SETTING))
    relations = sorted(set(cells["relation"]))
    references: dict[str, float] = {}
    if "manual_p1" in cells:
        manual = cells.dropna(subset=["manual_p1"]).groupby("relation")["manual_p1"].first()
        if set(manual.index) == set(relations):
            references["manual prompt"] = float(manual.mean())
    for label, p1 in runs.items():
        if all(r in p1 for r in relations):
            references[label] = sum(p1[r] for r in relations) / len(relations)
    refs = pd.DataFrame([{"series": label, "length": None, "macro_p1_mean": value, "macro_p1_std": None,
                          "seeds": None, "relations": len(relations)} for label, value in references.items()])
    atomic_write_text(out / f"{name}.csv", pd.concat([points, refs] if len(refs) else [points]).to_csv(index=False))
    if (points["length"] > 0).any():  # a grid without a length axis has no length figure
        plot_lengths(points[points["length"] > 0], references, out / f"{name}.png")


def is_sweep_folder(path: Path) -> bool:
    return (Path(path) / "grid.json").is_file() and (Path(path) / "cells").is_dir()


def draw_sweeps(sweeps: list[Path], runs: list, out: Path) -> list[Path]:
    """`probe compare` on sweep folders: each one's length figure into OUT/<sweep>-length.png|csv, the compared runs
    (ComparedRun) as reference lines over the sweep's relations; returns the files written."""
    written = []
    references = {run.label: {rid: row["p1"] for rid, row in run.rows.items()} for run in runs}
    for sweep in sweeps:
        rows = [read_json(p) for p in sorted(Path(sweep, "cells").glob("*.json"))]
        if not rows:
            raise ProbeError(f"sweep folder {sweep} holds no finished cell (cells/*.json)")
        cells = pd.DataFrame(rows)
        name = f"{slug(Path(sweep).name)}-length"
        draw_lengths(cells, summarise(cells), Path(out), {**reference_runs(sweep), **references}, name)
        written += [Path(out) / f"{name}.png", Path(out) / f"{name}.csv"]
    return written


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per setting: macro P@1 (and dev P@1) over relations for each seed, then mean and std over seeds."""
    setting = [c for c in SETTING if c in df]  # cells of older sweeps have no model column
    per_seed = df.groupby([*setting, "seed"], as_index=False).agg(p1=("p1", "mean"), dev_p1=("dev_p1", "mean"),
                                                                   relations=("relation", "nunique"))
    rows = []
    for key, group in per_seed.groupby(setting, sort=True):
        row = dict(zip(setting, key, strict=True))
        row.update(seeds=len(group), relations=int(group["relations"].min()))
        for m in ("p1", "dev_p1"):
            row[f"{m}_mean"] = float(group[m].mean())
            row[f"{m}_std"] = float(group[m].std(ddof=1)) if len(group) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_command(grid_path: Path, out: Path | None, data: str | None, device: str | None = None, log=print,
                  ray: str | None = None, cpus_per_worker: int | None = None, threads: int | None = None,
                  pack: int | None = None, jobs: int | None = None, report_to: list[str] | None = None) -> Path:
    """`probe sweep`: check the grid and its models, run the unfinished cells (here or on Ray); returns OUT/summary.md."""
    t0 = time.time()
    spec = load_grid(grid_path)
    trackers = check_report_to(report_to)
    check_output_path(out)
    lama = open_data(data)
    ids = list(lama.relations) if spec.relations == "all" else [lama.relation(r).id for r in spec.relations]
    load_template_spec(spec.template)  # a bad template fails before any model loads
    out = out or Path("runs") / f"sweep-{Path(grid_path).stem}"
    lama.vocab_words(spec.vocab)  # checks the vocabulary name
    check_pack(pack)
    executor = make_executor(lama, spec.vocab, ray, cpus_per_worker, threads, log, jobs)
    try:
        specs = executor_specs(spec, executor, device)
        pack = pack or default_pack(next(iter(specs.values())).device)
        for s in specs.values():  # every model's config and tokenizer can be read before any cell runs
            executor.check_device(s.device)
            model_info(s.name, s.device, s.dtype, s.control, check_device=executor.local)
        prepare_folder(out, spec, {"data": str(lama.root.resolve()), "torch_threads": executor.threads, "pack": pack})
        executor = reported(executor, trackers, out, read_json(out / "grid.json"))
        cells = cells_of(spec, ids, out, specs)
        log(f"{len(cells)} cells ({len(specs)} model(s) x {len(cells) // len(specs) // len(ids)} settings x {len(ids)} "
            "relations)")
        run_sweep(spec, ids, out, executor, specs, pack)
    except KeyboardInterrupt:
        raise Interrupted(out) from None
    finally:
        executor.close()
    log(f"{time.time() - t0:.0f}s in all")
    return out / "summary.md"
