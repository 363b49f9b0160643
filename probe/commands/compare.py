"""`probe compare`: run folders side by side (tables, plots), sweep folders drawn against prompt length; it prints
through `echo` as it goes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def compare_command(runs: list[Path], out: Path | None, allow_mixed: bool, force: bool, echo: Callable[[str], None],
                    log: Callable[[str], None]) -> None:
    """Compare run folders (and draw sweep folders), printing the tables and writing them to `out`."""
    import pandas as pd

    from probe.comparison import check_compare_out, compare_runs, load_runs, seed_table, write_comparison
    from probe.sweep import draw_sweeps, is_sweep_folder

    if out is not None:
        check_compare_out(out, force)
    out = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    sweeps = [p for p in runs if is_sweep_folder(p)]
    skipped: list[str] = []
    loaded = load_runs([p for p in runs if p not in sweeps], skipped) if len(sweeps) < len(runs) else []
    for folder in skipped:
        log(f"skipped {folder}")
    if sweeps:
        out.mkdir(parents=True, exist_ok=True)
        drawn = draw_sweeps(sweeps, loaded, out)
        echo(f"saved {', '.join(str(p) for p in drawn)}")
        if not loaded:
            return
    cmp = compare_runs(loaded, allow_mixed=allow_mixed)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_columns", None):
        echo(cmp.per_relation.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        echo("")
        echo(cmp.summary.drop(columns=["model"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if cmp.seeds is not None:
        echo("\nruns that differ only by seed (mean ± sample std over seeds):")
        echo(seed_table(cmp.seeds).to_string(index=False))
    echo("\n".join(cmp.notes))
    written = write_comparison(cmp, out)
    echo(f"saved {', '.join(str(p) for p in written)}")
