"""What `probe eval` and `probe train` share once their flags are checked: the model spec and what the driver reads of
it, the candidates line, run folders, a relation's files, and running the cells."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from probe.backends import ModelInfo, model_info
from probe.backends.loading import parse_max_memory
from probe.batching import fit_context
from probe.cells import CellOutput, Executor, LoadedModel, ModelSpec
from probe.controls import Control
from probe.data import Fact, Relation
from probe.errors import Interrupted
from probe.files import folder_name
from probe.objects import MASKED_SCORING
from probe.runs import RunFolder, default_out, slug  # noqa: F401 (default_out: there before)
from probe.templates import CompiledTemplate
from probe.vocab import CandidateChoice


@dataclass
class RunResult:
    """A finished (or interrupted) run: its folder, its results and how long it took."""

    folder: RunFolder
    results: dict
    seconds: float


def open_model(name: str, device: str | None, dtype: str | None, executor: Executor, control: Control,
               seed: int | None = None, max_memory: str | None = None) -> tuple[ModelSpec, ModelInfo]:
    """The spec workers load a model by (a control that changes the model applied with `seed`, a placement over
    several devices with `max_memory`) and, for the driver, its kind and tokenizer. The device is resolved here: auto
    is a GPU where the workers have one."""
    device = executor.device if device in (None, "auto") else device
    executor.check_device(device)
    parse_max_memory(max_memory)  # a malformed value fails before any model loads
    control_name = control.name if control.changes_model else "none"
    spec = ModelSpec(name, device, dtype or "bfloat16", control_name, (seed or 0) if control.changes_model else 0,
                     max_memory)
    info = model_info(name, device, spec.dtype, control_name, check_device=executor.local)
    return spec, info


def describe_candidates(choice: CandidateChoice, candidates, kind: str, ids: list[str]) -> tuple[dict, int, int]:
    """What a run config records of its candidates: (the objects entry, candidate count, source word count).

    --objects any builds each relation's candidates here, so that a candidate that tokenises to nothing stops the
    run before it starts."""
    if choice.objects is None:
        return {}, len(candidates), candidates.n_source
    per_relation = {rid: candidates.for_relation(rid) for rid in ids}
    words = {w for c in per_relation.values() for w in c.words}
    info = {**choice.objects.describe(), "candidates_per_relation": {rid: len(c) for rid, c in per_relation.items()}}
    if kind == "masked":
        info["masked_scoring"] = MASKED_SCORING
    return info, len(words), sum(c.n_source for c in per_relation.values())


def candidates_line(info: ModelInfo, dtype: str, choice: CandidateChoice, objects: dict, n: int, n_source: int) -> str:
    """The line that tells the user what the facts are ranked against."""
    head = f"{info.name} ({info.kind} LM, {dtype})"
    if choice.objects is None:
        return f"{head}: {n:,} of {n_source:,} {choice.vocab} vocab words are single tokens"
    sizes = objects["candidates_per_relation"].values()
    return (f"{head}: objects of any length, {n:,} distinct candidates ({objects['candidates']}), "
            f"{min(sizes):,} to {max(sizes):,} per relation")


def run_folder_for(out: Path | None, name: str, model: str, several: bool, config: dict, resume: bool) -> RunFolder:
    """A model's run folder, checked but not yet made: --out, else runs/<name>-<model>-<time>; with several models,
    `out` is their parent and each has <out>/<model>."""
    if out is None:
        return RunFolder(default_out(name, model), config, resume=resume)
    return RunFolder(Path(out) / slug(model) if several else out, config, resume=resume)


def execute(executor: Executor, runs: list[RunFolder], cells: list, desc: str, log=print) -> list[dict]:
    """Make the run folders and run the cells, keeping each run's tables current; a start refused by a cell takes
    back what this run made; Ctrl-C keeps what finished and names the folder to resume. The folders stay locked
    until the run ends, however it ends."""
    for cell in (m for c in cells for m in c.members):  # a pack's members, each with its own files
        why = cell.damaged()
        if why:
            log(f"warning: {cell.key} was marked finished but {why}: it is run again")
    try:
        try:
            for run in runs:
                run.create()
            progress = executor.run(cells, desc=desc)
        except KeyboardInterrupt:
            for run in runs:
                run.write_summary()
            raise Interrupted(runs[0].root if len(runs) == 1 else runs[0].root.parent) from None
        except BaseException:
            for run in runs:
                run.abandon()
            raise
        finally:
            executor.close()
        results = [run.write_summary() for run in runs]
    finally:
        for run in runs:
            run.release()
    progress.report(log)
    return results


def relation_row(relation: Relation) -> dict:
    """What a relation's metrics.json says of the relation: id, label, type (and whether it was inferred)."""
    return {"relation": relation.id, "label": relation.label, "type": relation.type,
            **({"type_inferred": True} if relation.type_inferred else {})}


TOO_LONG = "inputs longer than the model's context"


def candidate_counts(candidates, drops: dict[str, int]) -> dict:
    """What a relation's metrics say of its candidates: how many, and how many facts were dropped for each reason
    (`drops`: reason -> count), if any were."""
    drops = {k: v for k, v in drops.items() if v}
    return {"n_candidates": len(candidates),
            **({"dropped_reason": "; ".join(drops), "dropped_by_reason": drops} if drops else {})}


def dropped_line(drops: dict[str, int]) -> str:
    """Why facts were dropped, for an error: '3 objects that are not ...; 2 inputs longer than ...'."""
    return "; ".join(f"{n} {reason}" for reason, n in drops.items() if n) or "none dropped"


def relation_output(rid: str, metrics: dict, predictions: list[dict] | None = None,
                    files: tuple[tuple[str, bytes], ...] = ()) -> CellOutput:
    """A relation's files: any extra ones, then predictions.jsonl, then metrics.json, which marks it finished."""
    folder_name(rid)
    out = [(f"{rid}/{name}", blob) for name, blob in files]
    if predictions is not None:
        out.append((f"{rid}/predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions).encode()))
    listed = {**metrics, "files": [name.split("/", 1)[1] for name, _ in out]}  # a resume checks these are whole
    out.append((f"{rid}/metrics.json", (json.dumps(listed, indent=2, ensure_ascii=False) + "\n").encode()))
    return CellOutput(out)


def facts_in_context(loaded: LoadedModel, relation: Relation, compiled: CompiledTemplate, facts: list[Fact],
                     candidates, warnings: list[str]) -> tuple[list[Fact], int]:
    """The facts whose input fits the model's context, and how many did not; a warning names the first that did not."""
    kept, long = fit_context(compiled, facts, loaded.backend.max_positions, candidates)
    if long:
        fact, n = long[0]
        shown = fact.sub if len(fact.sub) <= 40 else fact.sub[:40] + "..."
        warnings.append(f"{relation.id}: {len(long)} fact(s) longer than the model's context of "
                        f"{loaded.backend.max_positions:,} tokens dropped, e.g. subject {shown!r} ({n:,} tokens)")
    return kept, len(long)


def results_text(results: dict) -> str:
    """What `probe eval` and `probe train` print of a run's results: the relations, the summary (and the manual
    prompt's), P@1 by object length, the relations not trained or below the manual prompt."""
    from probe.runs import length_table, relations_table, summary_table

    lines = [relations_table(results["relations"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"), "",
             "macro = mean over relations, micro = mean over facts; P@k in %, MRR as a fraction",
             summary_table(results["summary"]).to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    if "summary_manual" in results:
        lines += ["\nthe manual prompt on the same facts:",
                  summary_table(results["summary_manual"]).to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    if "by_length" in results:
        lines += ["\nby the gold object's token count (facts, micro P@1):",
                  length_table(results).to_string(index=False, float_format=lambda v: f"{v:.2f}")]
    if results.get("fit_failed"):
        lines.append(f"\nnot trained (dev P@1 never rose above its start, after every retry): "
                     f"{', '.join(results['fit_failed'])}")
    if results.get("below_manual"):
        kept = f"; the manual prompt kept for {', '.join(results['kept_manual'])}" if results.get("kept_manual") else ""
        lines.append(f"\nbelow the manual prompt on dev ({len(results['below_manual'])}): "
                     f"{', '.join(results['below_manual'])}" + kept)
    return "\n".join(lines)
