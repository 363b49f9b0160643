"""The figures, drawn headless (the Agg backend) to PNG files: `probe compare`'s bars and scatter, and a sweep's
P@1 against prompt length (with the CSV of the points it plots)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

RELATION_GROUPS = ["all", "1-1", "N-1", "N-M"]


@contextmanager
def png_axes(path: Path, size: tuple[float, float], legend_outside: bool = False) -> Iterator:
    """Axes to draw on; the figure is laid out, saved to `path` at 120 dpi and closed on leaving. With
    `legend_outside`, the legend stands right of the axes, where it hides no bar or point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        if legend_outside:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_types(figures: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """Grouped bars: macro P@1 overall and per relation type, a bar per series (runs that differ only by seed as one
    bar at their mean, with a ± std whisker)."""
    width = 0.8 / max(1, len(figures))
    with png_axes(path, (8, 4), legend_outside=True) as ax:
        for i, (label, (means, stds)) in enumerate(figures.items()):
            xs = [g + i * width for g in range(len(RELATION_GROUPS))]
            ax.bar(xs, means, width, yerr=stds if any(stds) else None, capsize=2, label=label)
        ax.set_xticks([g + width * (len(figures) - 1) / 2 for g in range(len(RELATION_GROUPS))], RELATION_GROUPS)
        ax.set_ylabel("macro P@1 (%)")
        ax.set_title("P@1 by relation type (runs that differ only by seed: mean ± std)")


def plot_manual_scatter(points: dict[str, tuple[list[float], list[float]]], path: Path) -> bool:
    """Per relation: manual P@1 against each series' P@1 (a seed group's mean); False when there is nothing to draw."""
    if not points:
        return False
    with png_axes(path, (7, 5.5), legend_outside=True) as ax:
        for (label, (xs, ys)), marker in zip(points.items(), "os^vDP*Xh<>" * 10, strict=False):
            ax.scatter(xs, ys, marker=marker, label=label, alpha=0.7)
        ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("manual prompt P@1 (%)")
        ax.set_ylabel("method P@1 (%)")
        ax.set_title("P@1 per relation")
    return True


def length_points(summary: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """The points of a sweep's length figure: one series per setting other than the length (method and its options,
    the model where there are several), macro P@1 mean and std over seeds at each length."""
    others = ["method"] + [c for c in setting if c not in ("method", "length") and c in summary
                           and summary[c].nunique(dropna=False) > 1]
    rows = []
    for key, group in summary.groupby(others, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = " / ".join(f"{c}={v}" if c != "method" else str(v) for c, v in zip(others, key, strict=True) if v != "-")
        for r in group.sort_values("length").to_dict("records"):
            rows.append({"series": label, "length": int(r["length"]), "macro_p1_mean": r["p1_mean"],
                         "macro_p1_std": r["p1_std"], "seeds": int(r["seeds"]), "relations": int(r["relations"])})
    return pd.DataFrame(rows, columns=["series", "length", "macro_p1_mean", "macro_p1_std", "seeds", "relations"])


def plot_lengths(points: pd.DataFrame, references: dict[str, float], path: Path) -> None:
    """Macro P@1 (test) against prompt length on a log axis: a line per series with a band of ± one std over seeds,
    and each reference (the manual prompt, fine-tuning) as a horizontal line."""
    with png_axes(path, (8, 4.5), legend_outside=True) as ax:
        for label, group in points.groupby("series", sort=False):
            mean, std = group["macro_p1_mean"], group["macro_p1_std"].fillna(0.0)
            (line,) = ax.plot(group["length"], mean, marker="o", label=label)
            ax.fill_between(group["length"], mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        for (label, value), style in zip(references.items(), ["--", ":", "-."] * 5, strict=False):
            if value is not None and not math.isnan(value):
                ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{label} ({value:.1f})")
        ax.set_xscale("log")
        lengths = sorted(points["length"].unique())
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xticks([], minor=True)  # only the grid's lengths are labelled (no "2 x 10^1" between them)
        ax.set_xlabel("virtual tokens (log scale)")
        ax.set_ylabel("macro P@1 (%), mean ± std over seeds")
        ax.set_title("P@1 against prompt length")


def plot_consistency(rows: list[dict], path: Path) -> bool:
    """ParaRel: per relation, consistency against the first pattern's accuracy (lama_acc), labelled by relation id
    (and, with a trained prompt, its agreement with the patterns against its accuracy); False when nothing to draw."""
    points = [(r["lama_acc"], r["consistency"], r["relation"]) for r in rows
              if r.get("consistency") is not None and r.get("lama_acc") is not None]
    if not points:
        return False
    prompt = [(r["prompt_acc"], r["prompt_agreement"]) for r in rows if r.get("prompt_agreement") is not None]
    with png_axes(path, (7, 5.5), legend_outside=True) as ax:
        ax.scatter([p[0] for p in points], [p[1] for p in points], label="patterns: consistency", alpha=0.7)
        for x, y, rid in points:
            ax.annotate(rid, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        if prompt:
            ax.scatter([p[0] for p in prompt], [p[1] for p in prompt], marker="^", alpha=0.7,
                       label="trained prompt: agreement with the patterns")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("accuracy (%): the first pattern (lama_acc), or the trained prompt")
        ax.set_ylabel("consistency (%)")
        ax.set_title("ParaRel consistency against accuracy, one point per relation")
    return True
