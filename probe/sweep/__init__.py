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

`probe sweep GRID --ray` runs the cells on Ray (probe/ray_cells.py) instead of one after another here.
    OUT/cells.csv         one row per cell
    OUT/summary.csv|.md   per setting: macro P@1 over relations, mean and std over seeds
    OUT/length.png|.csv   macro P@1 against prompt length (log axis), a line per method and options with a band of ± one
                          std over seeds, the manual prompt (and run folders put in OUT) as horizontal lines
"""

from probe.sweep.cell import SweepCell, cells_of, finish_cell, prepare_cell, run_cell
from probe.sweep.command import executor_specs, prepare_folder, run_sweep, sweep_command
from probe.sweep.grid import (
    AXES,
    NOT_APPLICABLE,
    OPTIONS,
    SETTING,
    SHARED_KEYS,
    SweepGrid,
    expand_settings,
    grid_axes,
    grid_models,
    grid_options,
    load_grid,
    setting_columns,
)
from probe.sweep.tables import (
    draw_lengths,
    draw_sweeps,
    is_sweep_folder,
    reference_runs,
    summarise,
    write_summary,
    write_tables,
)

__all__ = ["AXES", "NOT_APPLICABLE", "OPTIONS", "SETTING", "SHARED_KEYS", "SweepCell", "SweepGrid", "cells_of",
           "draw_lengths", "draw_sweeps", "executor_specs", "expand_settings", "finish_cell", "grid_axes", "grid_models",
           "grid_options", "is_sweep_folder", "load_grid", "prepare_cell", "prepare_folder", "reference_runs", "run_cell",
           "run_sweep", "setting_columns", "summarise", "sweep_command", "write_summary", "write_tables"]
