"""One sweep's tables and length figure from the cells of several folders of the same grid run apart (seed 13 in one
folder, seeds 14-15 in another, say): reads each folder's cells.csv, checks that no cell is in two of them, and
writes OUT/cells.csv, summary.csv|.md and length.png|.csv as `probe sweep` would have for one folder holding them all.

    python benchmarks/internal/merge_sweeps.py OUT FOLDER FOLDER...
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from probe.sweep import grid_axes, write_summary


def main(out: str, folders: list[str]) -> None:
    tables = []
    for folder in folders:
        path = Path(folder) / "cells.csv"
        if not path.is_file():
            sys.exit(f"error: {folder} has no cells.csv (is it a sweep folder?)")
        tables.append(pd.read_csv(path, keep_default_na=False, na_values=[""]))
    cells = pd.concat(tables, ignore_index=True)
    key = [c for c in (*grid_axes(), "relation") if c in cells]
    twice = cells[cells.duplicated(key)]
    if len(twice):
        sys.exit(f"error: {len(twice)} cell(s) are in more than one folder, e.g. {twice.iloc[0][key].to_dict()}")
    Path(out).mkdir(parents=True, exist_ok=True)
    write_summary(Path(out), cells)
    seeds = sorted(cells["seed"].unique())
    print(f"{len(cells)} cells, seeds {', '.join(map(str, seeds))}: {out}/summary.md, {out}/length.png")
    print((Path(out) / "summary.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python benchmarks/internal/merge_sweeps.py OUT FOLDER FOLDER...")
    main(sys.argv[1], sys.argv[2:])
