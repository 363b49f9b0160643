"""Run folders: a config, per-relation results written atomically as they finish, and summary tables.

    RUN/config.json            what produced the run (model, method, data, split, vocab, version, ...)
    RUN/P19/metrics.json       one relation's metrics, template and fact counts
    RUN/P19/predictions.jsonl  per fact: subject, gold object, rank, top-10 predictions
    RUN/results.json           config + every relation + macro/micro summary, per relation type too
    RUN/relations.csv          one row per relation
    RUN/summary.md             the printed table, in Markdown
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from probe import __version__
from probe.data import relation_key
from probe.errors import RunFolderError
from probe.files import atomic_write_bytes, atomic_write_json, atomic_write_text, damaged, folder_name, read_json
from probe.metrics import aggregate, pooled_breakdown

# Keys of a run config that must agree for --resume to reuse a folder.
IDENTITY_KEYS = ("command", "model", "method", "split", "vocab", "data", "template_file", "seed", "dtype",
                 "method_config", "train", "control", "objects", "candidates", "length_norm", "torch_threads", "pack",
                 "fallback", "score", "reduction")
# compared only where the folder's config records them (older runs do not)
RECORDED_LATER = ("torch_threads", "pack", "score", "reduction")
__all__ = ["IDENTITY_KEYS", "RunConfig", "RunFolder", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "markdown_table", "read_json", "relations_table", "slug", "summary_markdown", "summary_table"]


def slug(model: str) -> str:
    """A model name or path as a folder name: the file or folder name, other characters as -."""
    name = Path(model).name if ("/" in model or model.endswith(".gguf")) else model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.removesuffix(".gguf")) or "model"


def default_out(name: str, model: str) -> Path:
    """runs/<name>-<model>-<time>: a run folder's default."""
    return Path("runs") / f"{name}-{slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class RunConfig:
    """What produced a run folder: saved as its config.json, and compared key by key on --resume."""

    command: str
    model: str
    model_kind: str
    method: str | None
    data: str
    split: str
    vocab: str
    n_candidates: int
    n_vocab_words: int
    batch_size: int
    dtype: str
    device: str
    template_file: str | None = None
    seed: int | None = None
    control: str = "none"
    method_config: dict | None = None
    train: dict | None = None
    prompts: dict = field(default_factory=dict)  # a prompts file: its path, format, ensemble, prompts per relation
    data_spec: dict | None = None  # how to open the data again (facts files, fields, dev split)
    objects: dict | None = None  # --objects any: the candidates, their count per relation, the scoring
    from_sentences: bool | None = None  # cloze sentences instead of templates (causal LMs: the text before [MASK])
    torch_threads: int | None = None  # CPU threads of each process that computes (bfloat16 sums, so figures, depend on it)
    pack: int | None = None  # prompts trained at once (None: by the device, see probe/pack.py); rounding depends on it
    score: str | None = None  # "statement": answers ranked by their whole statement's log-likelihood (probe/statements.py)
    reduction: str | None = None  # --score statement: sum (LM Pub Quiz's default) or mean over the statement's tokens
    fallback: str | None = None  # "manual": relations whose trained prompt is below the manual one on dev keep it
    overlap: dict | None = None  # per relation, test facts that are also train or dev facts (train runs)
    allow_overlap: bool | None = None  # --allow-overlap: the overlap was known and accepted
    probe_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    @classmethod
    def of(cls, command: str, model, data, candidates=None, **fields) -> RunConfig:
        """A run config with the model (a Backend or a ModelInfo: name, kind, dtype, device, control), data and
        candidates (or the counts given) filled in from the objects themselves."""
        counts = {"n_candidates": len(candidates), "n_vocab_words": candidates.n_source} if candidates is not None else {}
        return cls(command=command, model=model.name, model_kind=model.kind, data=data.name, data_spec=data.spec(),
                   **counts, **{"dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
                                "control": model.control, **fields})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop("prompts"))
        out.update(out.pop("objects") or {})
        if self.control == "none":
            del out["control"]  # absent for the real LM
        return {k: v for k, v in out.items() if v is not None or k in ("template_file", "seed", "method")}


LOCK_NAME = ".probe.lock"


def check_own_folder(root: Path, marker: str = "config.json", flag: str = "--out") -> None:
    """A folder probe may write into: new, empty, or one that probe made (it holds `marker`) and no other run is
    writing into now. A folder of someone else's files is refused, never adopted."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"{flag} {root} is an existing file: expected a folder to write into")
    if root.is_dir() and not (root / marker).exists() and any(p.name != LOCK_NAME for p in root.iterdir()):
        raise RunFolderError(f"{flag} {root} holds files that probe did not write (it has no {marker}): expected a new or "
                             "empty folder, or a probe run folder")
    FolderLock.check(root)


class FolderLock:
    """An exclusive OS lock on a folder (flock on its .probe.lock, which names the holder's pid and host): one run
    writes into a folder at a time, and a crash leaves no lock behind. The lock file goes when the lock is released."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "pid unknown"
                os.close(self.fd)
                self.fd = None
                raise RunFolderError(f"run folder {root} is being written by another probe run ({holder}): wait for it to "
                                     "finish, or use another --out") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    break  # not removed by its last holder between our open and our lock
            except FileNotFoundError:
                pass
            os.close(self.fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)

    @staticmethod
    def check(root: Path) -> None:
        """Refuse now, before any model loads, a folder another run holds (the lock is taken later, by `create`)."""
        if (Path(root) / LOCK_NAME).is_file():
            FolderLock(root).release(remove=False)

    def __del__(self) -> None:
        self.release(remove=False)

    def release(self, remove: bool = True) -> None:
        """Unlock; the lock file is removed first (`remove`) unless it was there before (another's, then)."""
        if getattr(self, "fd", None) is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


class RunFolder:
    """A folder of results; relations already finished are kept and skipped on --resume.

    Opening one only checks it (an existing folder needs `resume`, and then the same settings; a folder of other
    files is refused); `create()` locks it and writes its config.json, once every other check has passed, and
    `abandon()` takes back the files and folders this run made if nothing finished, so that a refused start never
    blocks the rerun. Nothing that was there before is ever removed.
    """

    def __init__(self, root: str | Path, config: dict, resume: bool = False):
        self.root = Path(root)
        self.config = config
        self.made: list[Path] = []  # folders this run created, outermost first
        self.before: set[Path] | None = None  # what the folder held when this run opened it
        self.lock: FolderLock | None = None
        check_own_folder(self.root)
        config_path = self.root / "config.json"
        if config_path.exists():
            old = read_json(config_path)
            if not resume:
                raise RunFolderError(f"run folder {self.root} already exists: pass --resume to continue it, or another --out")
            diff = config_differences(old, config)
            if diff:
                hint = (f"; pass --threads {old['torch_threads']} to continue with its thread count"
                        if any(d.startswith("torch_threads") for d in diff) else "")
                raise RunFolderError(f"run folder {self.root} was made with other settings ({', '.join(diff)}){hint}")

    def create(self) -> RunFolder:
        """Make the folder (and the parents missing), lock it, then write its config.json."""
        self.made = [p for p in (self.root, *self.root.parents) if not p.exists()][::-1]
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(self.root)
        self.before = {p for p in self.root.rglob("*")}
        atomic_write_json(self.root / "config.json", self.config)
        return self

    def release(self) -> None:
        """Let other runs write into the folder again."""
        if self.lock is not None:
            self.lock.release()

    def abandon(self) -> None:
        """If no relation finished, remove the files and folders this run made, and nothing else."""
        if self.before is None or any(self.root.glob("*/metrics.json")):
            self.release()
            return
        ours = sorted((p for p in self.root.rglob("*") if p not in self.before and p.name != LOCK_NAME),
                      key=lambda p: len(p.parts), reverse=True)
        for path in ours:
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        self.release()
        for folder in reversed(self.made):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.before, self.made = None, []

    def relation_dir(self, rid: str) -> Path:
        return self.root / folder_name(rid)

    def is_done(self, rid: str) -> bool:
        return damaged(self.relation_dir(rid) / "metrics.json") is None

    def rows(self) -> list[dict]:
        """Metrics of every finished relation (one whose files are whole), in relation-id order."""
        found = [read_json(p) for p in self.root.glob("*/metrics.json") if damaged(p) is None]
        return sorted(({k: v for k, v in r.items() if k != "files"} for r in found), key=lambda r: relation_key(r["relation"]))

    def write_summary(self) -> dict:
        """results.json, relations.csv and summary.md from the finished relations; returns results."""
        rows = self.rows()
        results = {"config": self.config, "relations": rows, "summary": aggregate(rows)}
        for flag in ("fit_failed", "below_manual"):  # trained prompts flagged: never reported as trained quietly
            flagged = [r["relation"] for r in rows if r.get(flag)]
            if flagged:
                results[flag] = flagged
        kept = [r["relation"] for r in rows if r.get("kept") == "manual"]
        if kept:
            results["kept_manual"] = kept
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
    columns = TABLE_COLUMNS + [c for c in ("dev_p1", "manual_dev_p1", "manual_p1") if any(c in r for r in rows)]
    columns += [c for c in ("fit_failed", "below_manual", "kept") if any(r.get(c) for r in rows)]
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
    if results.get("below_manual"):
        summ += (f"\n\n**Below the manual prompt on dev** ({len(results['below_manual'])}): "
                 f"{', '.join(results['below_manual'])}."
                 + (f" The manual prompt is kept for {', '.join(results['kept_manual'])} (--fallback manual); their rows "
                    "are the manual prompt's." if results.get("kept_manual") else ""))
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


def config_differences(old: dict, new: dict) -> list[str]:
    """The identity settings that differ between a folder's config and a run's, as `key: old there, new asked`; for
    settings that are tables (train, method_config), only the entries that differ (`train.max_train: 64 there, 32
    asked`)."""
    out = []
    for key in IDENTITY_KEYS:
        if key in RECORDED_LATER and key not in old:
            continue
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} there, {b.get(k)!r} asked" for k in dict.fromkeys([*a, *b])
                    if a.get(k) != b.get(k)]
        else:
            out.append(f"{key}: {a!r} there, {b!r} asked")
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table, floats to two decimals (MRR-like fractions to three)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) <= 1 and v != 0 else f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
