"""A sweep folder's tables and figure: cells.csv, summary.csv|.md (mean ± std over seeds), length.png|.csv; and
`probe compare` on sweep folders."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from probe.cells import Cell
from probe.comparison import mean_std, run_label
from probe.errors import RunFolderError
from probe.files import atomic_write_text, read_json
from probe.plots import length_points, plot_lengths
from probe.runs import markdown_table, slug
from probe.sweep.grid import setting_columns


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
    shown = shown[[*(c for c in setting_columns() if c in shown), "seeds", "relations", "p1", "dev_p1"]].rename(
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
    points = length_points(summary, list(setting_columns()))
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
            raise RunFolderError(f"sweep folder {sweep} holds no finished cell (cells/*.json)")
        cells = pd.DataFrame(rows)
        name = f"{slug(Path(sweep).name)}-length"
        draw_lengths(cells, summarise(cells), Path(out), {**reference_runs(sweep), **references}, name)
        written += [Path(out) / f"{name}.png", Path(out) / f"{name}.csv"]
    return written


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per setting: macro P@1 (and dev P@1) over relations for each seed, then mean and std over seeds."""
    setting = [c for c in setting_columns() if c in df]  # cells of older sweeps have no model column
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
