"""The commands behind `probe eval` (eval.py), `probe train` (train.py) and `probe eval --prompts` (rerun.py), with
what they share (common.py); dispatch.py is the one entry per command that the CLI and the API call; compare.py and
templates.py are `probe compare` and `probe templates`. Each checks every flag before any folder is made or any model
is loaded, builds its cells, and hands them to an executor (probe/cells.py, probe/ray_cells.py)."""
