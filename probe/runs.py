"""Run folders: a config, per-relation results written atomically as they finish, and summary tables.

    RUN/config.json            what produced the run (model, method, data, split, vocab, version, ...)
    RUN/P19/metrics.json       one relation's metrics, template and fact counts
    RUN/P19/predictions.jsonl  per fact: subject, gold object, rank, top-10 predictions
    RUN/results.json           config + every relation + macro/micro summary, per relation type too
    RUN/relations.csv          one row per relation
    RUN/summary.md             the printed table, in Markdown
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from probe.data import relation_key
from probe.errors import ProbeError
from probe.metrics import aggregate, pooled_breakdown

# Keys of a run config that must agree for --resume to reuse a folder.
IDENTITY_KEYS = ("command", "model", "method", "split", "vocab", "data", "template_file", "seed", "dtype",
                 "method_config", "train", "control", "objects", "candidates", "length_norm")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProbeError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ProbeError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def slug(model: str) -> str:
    """A model name or path as a folder name: the file or folder name, other characters as -."""
    name = Path(model).name if ("/" in model or model.endswith(".gguf")) else model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.removesuffix(".gguf")) or "model"


class JsonlLog:
    """A training log: one JSON object a line, flushed as written; does nothing without a path."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def write(self, entry: dict) -> None:
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class RunFolder:
    """A folder of results; relations already finished are kept and skipped on --resume."""

    def __init__(self, root: str | Path, config: dict, resume: bool = False):
        self.root = Path(root)
        self.config = config
        config_path = self.root / "config.json"
        if config_path.exists():
            old = read_json(config_path)
            if not resume:
                raise ProbeError(f"run folder {self.root} already exists: pass --resume to continue it, or another --out")
            diff = [k for k in IDENTITY_KEYS if old.get(k) != config.get(k)]
            if diff:
                shown = ", ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} asked" for k in diff)
                raise ProbeError(f"run folder {self.root} was made with other settings ({shown})")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config_path, config)

    def relation_dir(self, rid: str) -> Path:
        return self.root / rid

    def is_done(self, rid: str) -> bool:
        return (self.relation_dir(rid) / "metrics.json").exists()

    def save_relation(self, rid: str, metrics: dict, predictions: list[dict] | None = None) -> None:
        """Write predictions first and metrics last: metrics.json marks the relation as finished."""
        folder = self.relation_dir(rid)
        if predictions is not None:
            lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
            atomic_write_text(folder / "predictions.jsonl", lines)
        atomic_write_json(folder / "metrics.json", metrics)

    def rows(self) -> list[dict]:
        """Metrics of every finished relation, in relation-id order."""
        found = [read_json(p) for p in self.root.glob("*/metrics.json")]
        return sorted(found, key=lambda r: relation_key(r["relation"]))

    def write_summary(self) -> dict:
        """results.json, relations.csv and summary.md from the finished relations; returns results."""
        rows = self.rows()
        results = {"config": self.config, "relations": rows, "summary": aggregate(rows)}
        failed = [r["relation"] for r in rows if r.get("fit_failed")]
        if failed:  # trained prompts whose dev figures never rose: flagged, never reported as trained quietly
            results["fit_failed"] = failed
        if rows and all("manual_p1" in r for r in rows):  # training runs also test the manual prompt
            manual = [{**r, **{m: r[f"manual_{m}"] for m in ("p1", "p10", "mrr")}} for r in rows]
            results["summary_manual"] = aggregate(manual)
        if any("by_length" in r for r in rows):  # objects of any length: facts and P@1 by the gold's token count
            results["by_length"] = pooled_breakdown(rows)
            if any("manual_by_length" in r for r in rows):
                results["by_length_manual"] = pooled_breakdown(rows, "manual_by_length")
        atomic_write_json(self.root / "results.json", results)
        table = relations_table(rows)
        atomic_write_text(self.root / "relations.csv", table.to_csv(index=False))
        atomic_write_text(self.root / "summary.md", summary_markdown(results))
        return results


TABLE_COLUMNS = ["relation", "label", "type", "n_facts", "n_dropped", "p1", "p10", "mrr"]


def relations_table(rows: list[dict]) -> pd.DataFrame:
    columns = TABLE_COLUMNS + [c for c in ("dev_p1", "manual_p1") if any(c in r for r in rows)]
    columns += ["fit_failed"] if any(r.get("fit_failed") for r in rows) else []
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)


def summary_table(summary: dict) -> pd.DataFrame:
    """Macro and micro P@1/P@10/MRR, overall and per relation type."""
    out = []
    for group, s in summary.items():
        out.append({
            "group": group, "relations": s["relations"], "facts": s["facts"],
            "macro_p1": s["macro_p1"], "micro_p1": s["micro_p1"],
            "macro_p10": s["macro_p10"], "micro_p10": s["micro_p10"],
            "macro_mrr": s["macro_mrr"], "micro_mrr": s["micro_mrr"],
        })
    return pd.DataFrame(out)


def summary_markdown(results: dict) -> str:
    cfg = results["config"]
    head = f"# {cfg.get('method')} on {cfg.get('model')} ({cfg.get('split')}, vocab {cfg.get('vocab')})\n\n"
    note = "Macro: mean over relations. Micro: mean over facts. P@k in percent, MRR as a fraction.\n\n"
    rel = markdown_table(relations_table(results["relations"]))
    summ = markdown_table(summary_table(results["summary"]))
    if "summary_manual" in results:
        summ += "\n\nThe manual prompt on the same facts:\n\n" + markdown_table(summary_table(results["summary_manual"]))
    if "by_length" in results:
        summ += "\n\nBy the gold object's token count (facts, micro P@1):\n\n" + markdown_table(length_table(results))
    if results.get("fit_failed"):
        summ += (f"\n\n**Not trained** (dev P@1 never rose above the untrained prompt's, after every retry): "
                 f"{', '.join(results['fit_failed'])}. Their rows are the untrained prompt.")
    return head + note + summ + "\n\n" + rel + "\n"


def length_table(results: dict) -> pd.DataFrame:
    """Facts and micro P@1 by the gold's token count; the manual prompt's next to a trained one's."""
    rows = []
    for bucket, b in results["by_length"].items():
        row = {"tokens": bucket, "facts": b["facts"], "p1": b["p1"]}
        if "by_length_manual" in results:
            row["manual_p1"] = results["by_length_manual"].get(bucket, {}).get("p1")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table, floats to two decimals (MRR-like fractions to three)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) <= 1 and v != 0 else f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
