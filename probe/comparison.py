"""Compare run folders: methods against relations (P@1), macro/micro summaries on shared relations, plots.

    OUT/compare.csv       one row per run: summary figures, then P@1 per relation
    OUT/compare.md        the summary table and the per-relation P@1 table
    OUT/types.png         macro P@1 per relation type, one bar per run
    OUT/manual_vs.png     per relation: manual P@1 (x) against each other run's P@1 (y)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from probe.data import RELATION_TYPES, read_jsonl, relation_key
from probe.errors import RunFolderError
from probe.files import atomic_write_text, read_json
from probe.methods import METHODS
from probe.metrics import aggregate, relation_metrics
from probe.plots import plot_manual_scatter, plot_types
from probe.runs import markdown_table, slug

# Settings that must agree for P@1 figures to be comparable (else --allow-mixed). Runs of different models are
# compared on the facts every run keeps (see on_common_facts).
COMPARABLE_KEYS = ("vocab", "split", "objects")
DEFAULTS = {"objects": "single"}  # what a config without the key means


@dataclass
class ComparedRun:
    """One run folder's results: a label, its config and its relation rows by id."""

    folder: Path
    label: str
    config: dict
    rows: dict[str, dict]


@dataclass
class Comparison:
    """What `probe compare` prints and saves."""

    runs: list[ComparedRun]
    relations: list[str]
    summary: pd.DataFrame
    per_relation: pd.DataFrame
    manual_p1: dict[str, dict[str, float]]
    notes: list[str]
    seeds: pd.DataFrame | None = None  # runs that differ only by seed, grouped: mean and sample std


def find_run_folders(paths: list[Path], skipped: list[str] | None = None) -> list[Path]:
    """Each path is a run folder (holding results.json) or a folder of run folders. Folders inside that are not
    finished runs (a config.json, or relations, but no results.json: interrupted or still running) are left out, and
    named in `skipped`."""
    found = []
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            found.append(path)
            continue
        if not path.exists():
            raise RunFolderError(f"{path} does not exist: expected a run folder or a folder of run folders")
        if (path / "config.json").is_file():
            raise RunFolderError(f"{path} has no results.json: the run did not finish (rerun it with --resume)")
        inner = sorted(p.parent for p in path.glob("*/results.json"))
        if not path.is_dir() or not inner:
            raise RunFolderError(f"{path} is not a run folder (no results.json) nor a folder of run folders")
        found.extend(inner)
        if skipped is not None:
            skipped += [f"{p} (no results.json: an unfinished run)" for p in sorted(path.iterdir())
                        if p.is_dir() and not (p / "results.json").is_file() and (p / "config.json").is_file()]
    return list(dict.fromkeys(found))


def run_label(config: dict) -> str:
    """The method name, with any init or reparam other than the method's default (`autoprompt+init=manual`);
    runs of a prompts file add the file's stem (and +ens for an ensemble), runs of objects of any length +any."""
    label = config.get("method") or config.get("control") or "?"
    if label in METHODS and config.get("method_config"):
        default = METHODS[label].config_class()
        for key in default.values():
            value = config["method_config"].get(key)
            if value is not None and value != getattr(default, key):
                label += f"+{key}={value}"
    if config.get("prompts_file"):
        label += f":{Path(config['prompts_file']).stem}" + ("+ens" if config.get("ensemble") else "")
    if config.get("method") and config.get("control", "none") != "none":
        label += f"+{config['control']}"
    if config.get("objects") == "any":
        label += "+any"
    return label


def load_runs(paths: list[Path], skipped: list[str] | None = None) -> list[ComparedRun]:
    """The finished runs among `paths` (see find_run_folders; the unfinished ones go to `skipped`)."""
    runs = []
    for folder in find_run_folders(paths, skipped):
        results = read_json(folder / "results.json")
        if not isinstance(results, dict) or "config" not in results or "relations" not in results:
            raise RunFolderError(f"{folder}/results.json: expected 'config' and 'relations' (a probe run folder)")
        rows = {r["relation"]: r for r in results["relations"]}
        runs.append(ComparedRun(folder, run_label(results["config"]), results["config"], rows))
    if len({run.config.get("model") for run in runs}) > 1:  # several models: side by side, named by model
        for run in runs:
            run.label += f" @ {slug(str(run.config.get('model')))}"
    labels = [r.label for r in runs]
    for run in runs:  # the same label twice: tell them apart by folder name
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.folder.name})"
    return runs


def check_comparable(runs: list[ComparedRun]) -> None:
    """Runs of different vocabularies, splits or object protocols (--objects single/any) are a ProbeError naming
    what differs and where."""
    differences = []
    for key in COMPARABLE_KEYS:
        values: dict[str, list[str]] = {}
        for run in runs:
            values.setdefault(str(run.config.get(key, DEFAULTS.get(key))), []).append(str(run.folder))
        if len(values) > 1:
            differences.append(f"{key} " + "; ".join(f"{v!r} in {', '.join(folders)}" for v, folders in values.items()))
    if differences:
        raise RunFolderError(f"runs differ in {' / '.join(differences)}: pass --allow-mixed to compare them anyway")


def is_reference(config: dict) -> bool:
    """A run of the method that the others are measured against (the manual prompt)."""
    method = METHODS.get(config.get("method") or "")
    return method is not None and method.reference


def below_manual(row: dict) -> bool:
    """A trained relation's prompt below the manual prompt on dev: its flag, or, for runs made before the flag, its
    dev P@1 against the manual prompt's dev P@1."""
    if "below_manual" in row:
        return bool(row["below_manual"])
    return "dev_p1" in row and "manual_dev_p1" in row and row["dev_p1"] < row["manual_dev_p1"]


def _manual_reference(run: ComparedRun, runs: list[ComparedRun], relations: list[str]) -> tuple[dict[str, float] | None, str]:
    """Manual P@1 per relation for a run: its own manual_p1 (train runs), else a manual run of the same model."""
    if is_reference(run.config):
        return {r: run.rows[r]["p1"] for r in relations}, run.label
    if all("manual_p1" in run.rows[r] for r in relations):
        return {r: run.rows[r]["manual_p1"] for r in relations}, "own manual_p1"
    same = ("model", "objects")
    manual = [m for m in runs if is_reference(m.config) and all(m.config.get(k) == run.config.get(k) for k in same)]
    if manual:
        return {r: manual[0].rows[r]["p1"] for r in relations}, manual[0].label
    return None, ""


def predictions_of(run: ComparedRun, rid: str) -> list[dict]:
    path = run.folder / rid / "predictions.jsonl"
    if not path.is_file():
        raise RunFolderError(f"{path} not found: runs of several models are compared fact by fact, from their predictions")
    return [row for _, row in read_jsonl(path)]


def on_common_facts(runs: list[ComparedRun], relations: list[str]) -> str | None:
    """Runs of several models keep different facts (an object must be one token of each model). Like LAMA's common
    vocabulary, every relation's figures are recomputed on the facts that every run keeps; returns the note saying
    how many, or None for runs of one model."""
    if len({run.config.get("model") for run in runs}) < 2:
        return None
    kept = most = 0
    for rid in relations:
        predictions = {run.folder: predictions_of(run, rid) for run in runs}
        common = set.intersection(*({(p["sub"], p["obj"]) for p in preds} for preds in predictions.values()))
        kept += len(common)
        most += max(len(preds) for preds in predictions.values())
        for run in runs:
            ranks = [p["rank"] for p in predictions[run.folder] if (p["sub"], p["obj"]) in common]
            # a train run's manual figures were on its own facts, so they are left out here
            row = {k: v for k, v in run.rows[rid].items() if not k.startswith("manual_")}
            run.rows[rid] = {**row, "n_facts": len(common), "n_own_facts": row["n_facts"], **relation_metrics(ranks)}
    return (f"runs of {len({run.config.get('model') for run in runs})} models: every relation is compared on the facts "
            f"that every run keeps, {kept:,} of the {most:,} of the run that keeps most")


def compare_runs(runs: list[ComparedRun], allow_mixed: bool = False) -> Comparison:
    """Summary figures per run over the relations every run holds, and P@1 per relation."""
    if not runs:
        raise RunFolderError("no run folders to compare")
    if not allow_mixed:
        check_comparable(runs)
    relations = [r for r in runs[0].rows if all(r in run.rows for run in runs)]
    relations.sort(key=relation_key)
    if not relations:
        raise RunFolderError("the runs share no relation: nothing to compare")
    notes = [f"macro/micro over the {len(relations)} relations present in all {len(runs)} runs"]
    lacking: dict[str, list[str]] = {}  # runs lacking some relations -> those relations
    for rid in sorted({r for run in runs for r in run.rows} - set(relations), key=relation_key):
        lacking.setdefault(", ".join(str(run.folder) for run in runs if rid not in run.rows), []).append(rid)
    notes += [f"left out: {', '.join(rids)} (not in {folders})" for folders, rids in lacking.items()]
    if allow_mixed:
        notes.append("--allow-mixed: each run on the facts it kept itself")
    elif common := on_common_facts(runs, relations):
        notes.append(common)
        empty = [r for r in relations if runs[0].rows[r]["n_facts"] == 0]
        if empty:
            notes.append(f"left out: {', '.join(empty)} (no fact kept by every run)")
            relations = [r for r in relations if r not in empty]
        if not relations:
            raise RunFolderError("the runs share no fact: nothing to compare")
    summary, manual_p1 = [], {}
    for run in runs:
        rows = [run.rows[r] for r in relations]
        agg = aggregate(rows)
        entry = {"label": run.label, "model": run.config.get("model"), "relations": agg["all"]["relations"],
                 "facts": agg["all"]["facts"]}
        for key in ("macro_p1", "micro_p1", "macro_p10", "micro_p10", "macro_mrr", "micro_mrr"):
            entry[key] = agg["all"][key]
        for t in RELATION_TYPES:
            entry[f"p1_{t}"] = agg[t]["macro_p1"] if t in agg else None
        reference, source = _manual_reference(run, runs, relations)
        entry["manual_p1"] = entry["gain_p1"] = None
        if reference is not None:
            manual_p1[run.label] = reference
            entry["manual_p1"] = sum(reference.values()) / len(reference)
            entry["gain_p1"] = entry["macro_p1"] - entry["manual_p1"]
        entry["manual_from"] = source
        failed = [r for r in relations if run.rows[r].get("fit_failed")]
        below = [r for r in relations if below_manual(run.rows[r])]
        entry["fit_failed"], entry["below_manual"] = len(failed), len(below)
        named = run.label if run.label.endswith(f"({run.folder.name})") else f"{run.label} ({run.folder})"
        if failed:
            notes.append(f"{named}: {', '.join(failed)} flagged fit_failed (dev P@1 never rose "
                         "above the start): their figures are the untrained prompt's")
        if below:
            kept = [r for r in below if run.rows[r].get("kept") == "manual"]
            notes.append(f"{named}: {', '.join(below)} flagged below_manual (dev P@1 below the manual prompt's)"
                         + (f"; the manual prompt kept for {', '.join(kept)}" if kept else ""))
        summary.append(entry)
    first = runs[0].rows
    per_relation = pd.DataFrame([
        {"relation": r, "label": first[r].get("label"), "type": first[r].get("type"),
         **{run.label: run.rows[r]["p1"] for run in runs}}
        for r in relations
    ])
    columns = ["label", "model", "relations", "facts", "macro_p1", "micro_p1", "macro_p10", "micro_p10", "macro_mrr",
               "micro_mrr", *[f"p1_{t}" for t in RELATION_TYPES], "manual_p1", "gain_p1", "manual_from"]
    columns += [c for c in ("fit_failed", "below_manual") if any(entry[c] for entry in summary)]
    table = pd.DataFrame(summary).reindex(columns=columns)
    seeds = seed_groups(runs, table)
    if seeds is not None:
        notes += seed_notes(seeds)
    return Comparison(runs, relations, table, per_relation, manual_p1, notes, seeds)


SEED_FIGURES = ("macro_p1", "micro_p1", *[f"p1_{t}" for t in RELATION_TYPES])


def without_seed(config: dict) -> str:
    """A run's config with its seeds (and creation time, version, threads and device) left out: runs alike but for the
    seed share it."""
    out = {k: v for k, v in config.items() if k not in ("seed", "created", "probe_version", "torch_threads", "device")}
    for key in ("train", "data_spec"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k != "seed"}
    return json.dumps(out, sort_keys=True, default=str)


def group_labels(runs: list[ComparedRun], groups: list[list[int]]) -> list[str]:
    """A label per group of runs (its first run's); groups that would share one are told apart by the settings in which
    their configs differ (e.g. `ptuning [pack=4]` next to `ptuning [pack=None]`)."""
    labels = [run_label(runs[members[0]].config) for members in groups]
    settings = [json.loads(without_seed(runs[members[0]].config)) for members in groups]
    out = []
    for i, label in enumerate(labels):
        alike = [j for j, other in enumerate(labels) if other == label and j != i]
        keys = sorted({k for j in alike for k in settings[i].keys() | settings[j].keys()
                       if settings[i].get(k) != settings[j].get(k)})
        shown = ", ".join(f"{k}={json.dumps(settings[i].get(k), default=str)[:40]}" for k in keys[:3])
        out.append(f"{label} [{shown}]" if alike and shown else label)
    return out


def seed_groups(runs: list[ComparedRun], summary: pd.DataFrame) -> pd.DataFrame | None:
    """Per group of runs that differ only by seed: the seeds, and mean and sample std over them of macro and micro
    P@1 and of macro P@1 per relation type; None when no two runs differ only by seed."""
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(without_seed(run.config), []).append(i)
    if all(len(members) < 2 for members in groups.values()):
        return None
    rows = []
    for members, label in zip(groups.values(), group_labels(runs, list(groups.values())), strict=True):
        figures = summary.iloc[members]
        seeds = [str(runs[i].config["seed"]) for i in members if runs[i].config.get("seed") is not None]
        row = {"label": label, "runs": len(members), "seeds": ", ".join(seeds),
               "repeated_seeds": ", ".join(dict.fromkeys(s for s in seeds if seeds.count(s) > 1))}
        for key in SEED_FIGURES:
            values = figures[key].dropna().astype(float)
            row[f"{key}_mean"] = float(values.mean()) if len(values) else None
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        for flag in ("fit_failed", "below_manual"):
            if flag in summary:
                row[flag] = int(figures[flag].sum())  # flagged relations, over the group's runs
        rows.append(row)
    return pd.DataFrame(rows)


def seed_notes(seeds: pd.DataFrame) -> list[str]:
    """A note for each group that repeats a seed, and for each two seed groups whose mean macro P@1 differ by less
    than the larger seed spread."""
    notes = []
    for group in seeds.to_dict("records"):
        if group["repeated_seeds"]:
            notes.append(f"{group['label']}: seed {group['repeated_seeds']} appears in more than one run (reruns, e.g. "
                         "of other code): its std is not only a seed spread")
    groups = seeds[seeds["runs"] > 1].sort_values("macro_p1_mean", ascending=False).to_dict("records")
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            gap, spread = a["macro_p1_mean"] - b["macro_p1_mean"], max(a["macro_p1_std"], b["macro_p1_std"])
            if gap < spread:
                notes.append(f"{a['label']} and {b['label']}: macro P@1 {gap:.2f} apart, less than the seed spread "
                             f"(std {spread:.2f}): these seeds do not tell them apart")
    return notes


def mean_std(mean: float | None, std: float | None) -> str:
    """`mean ± std` as printed; the mean alone where there is no spread (one seed), nothing where there is no mean."""
    if mean is None or pd.isna(mean):
        return ""
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None and not pd.isna(std) else "")


def seed_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """The seed groups as printed: `mean ± std` per figure."""
    out = seeds[["label", "runs", "seeds"]].copy()
    for key in SEED_FIGURES:
        out[key] = [mean_std(m, s) for m, s in zip(seeds[f"{key}_mean"], seeds[f"{key}_std"], strict=True)]
    for flag in ("fit_failed", "below_manual"):
        if flag in seeds:
            out[flag] = seeds[flag]
    return out


def wide_table(cmp: Comparison) -> pd.DataFrame:
    """compare.csv: one row per run, its summary figures then its P@1 on every shared relation."""
    p1 = cmp.per_relation.set_index("relation")[[run.label for run in cmp.runs]].T
    p1.columns = [f"p1_{r}" for r in p1.columns]
    out = cmp.summary.copy()
    out.insert(1, "folder", [str(run.folder) for run in cmp.runs])
    return pd.concat([out.reset_index(drop=True), p1.reset_index(drop=True)], axis=1)


def comparison_markdown(cmp: Comparison) -> str:
    head = "# Comparison\n\n" + "\n".join(f"- {n}" for n in cmp.notes)
    head += "\n- macro = mean over relations, micro = mean over facts; P@k in %, MRR as a fraction; " \
            "p1_<type>: macro P@1 per relation type; gain_p1 = macro_p1 - manual_p1\n"
    runs = "\n".join(f"- {run.label}: {run.folder}" for run in cmp.runs)
    seeds = "" if cmp.seeds is None else ("\n\nRuns that differ only by seed (mean ± sample std over seeds):\n\n"
                                          + markdown_table(seed_table(cmp.seeds)))
    return (head + "\n" + markdown_table(cmp.summary) + seeds + "\n\nP@1 per relation:\n\n"
            + markdown_table(cmp.per_relation) + "\n\nRun folders:\n\n" + runs + "\n")


def check_compare_out(out: Path, force: bool) -> None:
    """An existing --out is refused unless --force (its files would be overwritten); a file is never a folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is an existing file: expected a folder to write into")
    if out.exists() and not force:
        raise RunFolderError(f"--out {out} already exists: pass --force to overwrite its comparison, or another --out")


def write_comparison(cmp: Comparison, out: Path) -> list[Path]:
    """compare.csv, compare.md and the plots into a folder; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "compare.csv", out / "compare.md", out / "types.png"]
    atomic_write_text(written[0], wide_table(cmp).to_csv(index=False))
    atomic_write_text(written[1], comparison_markdown(cmp))
    series = run_series(cmp.runs)
    plot_types(series_figures(cmp, series), written[2])
    if cmp.seeds is not None:
        written.append(out / "compare_seeds.csv")
        atomic_write_text(written[-1], cmp.seeds.to_csv(index=False))
    if plot_manual_scatter(manual_points(cmp, series), out / "manual_vs.png"):
        written.append(out / "manual_vs.png")
    return written


def run_series(runs: list[ComparedRun]) -> list[tuple[str, list[int]]]:
    """The runs as the plots draw them: runs that differ only by seed as one series (their mean, ± std), each other run
    as a series of its own; (label, indices of its runs), in the order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(without_seed(run.config), []).append(i)
    out = []
    for members, shared in zip(groups.values(), group_labels(runs, list(groups.values())), strict=True):
        label = runs[members[0]].label if len(members) == 1 else f"{shared} ({len(members)} seeds)"
        if len(members) > 1 and len({r.config.get("model") for r in runs}) > 1:
            label += f" @ {slug(str(runs[members[0]].config.get('model')))}"
        out.append((label, members))
    return out


def series_figures(cmp: Comparison, series: list[tuple[str, list[int]]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per series: macro P@1 overall and per relation type, as the mean over its runs and their sample std."""
    rows = cmp.summary.to_dict("records")
    keys = ["macro_p1", *[f"p1_{t}" for t in RELATION_TYPES]]
    out = {}
    for label, members in series:
        values = [[rows[i][k] for i in members] for k in keys]
        clean = [[float(v) for v in vs if v is not None and not pd.isna(v)] for vs in values]
        means = [sum(vs) / len(vs) if vs else 0.0 for vs in clean]
        stds = [float(pd.Series(vs).std(ddof=1)) if len(vs) > 1 else 0.0 for vs in clean]
        out[label] = (means, stds)
    return out


def manual_points(cmp: Comparison, series: list[tuple[str, list[int]]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per series with a manual reference (not the manual runs themselves): per relation, the manual P@1 and the
    series' P@1, each its runs' mean."""
    out = {}
    for label, members in series:
        runs = [cmp.runs[i] for i in members if cmp.runs[i].label in cmp.manual_p1 and not is_reference(cmp.runs[i].config)]
        if not runs:
            continue
        out[label] = ([sum(cmp.manual_p1[r.label][rid] for r in runs) / len(runs) for rid in cmp.relations],
                      [sum(r.rows[rid]["p1"] for r in runs) / len(runs) for rid in cmp.relations])
    return out
