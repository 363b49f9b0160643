"""The one fit cell: a relation's prompt fit on train with selection on dev, then tested next to the manual prompt.

`probe train` (a relation of a run folder), `probe sweep` (a cell of a grid) and the Python API all run these two
steps; they differ only in where the figures go (a relation's files, a sweep row, a DataFrame):

- `prepare_fit`: the relation's facts (those whose input fits the model's context), the manual prompt's dev figures
  (what a fit is retried, then flagged `below_manual`, for staying below) and the FitTask;
- `finish_fit`: the fitted prompt tested, next to the manual prompt; `fallback="manual"` keeps the manual prompt where
  the trained one is below it on dev. It returns a `Tested`: the relation's metrics, config and files.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probe.cells import CellOutput, LoadedModel
from probe.commands.common import TOO_LONG, candidate_counts, dropped_line, facts_in_context, relation_row
from probe.commands.eval import single_candidate_warning
from probe.data import Fact
from probe.errors import DataError
from probe.evaluator import RelationEval, evaluate_facts
from probe.fit import FitTask, Fitted
from probe.methods import FixedPrompt, get_method
from probe.saved_prompts import prompt_bytes, safetensors_bytes
from probe.templates import CompiledTemplate, Template, compile_template


@dataclass
class Prepared:
    """A relation ready to fit: its task, its test facts (and how many were dropped), the manual template it is tested
    next to, warnings for the user, a scratch folder to remove once finished (Ray workers), when it started."""

    task: FitTask
    test: list[Fact]
    dropped: dict[str, int]  # test facts dropped, by reason
    manual: CompiledTemplate
    warnings: list[str]
    scratch: str | None = None
    template: Template | None = None
    t0: float = field(default_factory=time.time)


@dataclass
class Tested:
    """A tested fit: the relation's metrics (metrics.json, a sweep row's figures), its config.json entries, the files
    it made (train log, prompt), the kept prompt's evaluation, warnings and the line for the user."""

    metrics: dict
    config: dict
    files: list[tuple[str, bytes]]
    evaluation: RelationEval
    warnings: list[str]
    message: str


def _manual_eval(loaded: LoadedModel, relation: str, split: str, manual: CompiledTemplate, facts: list[Fact],
                 candidates, batch_size: int) -> RelationEval:
    """The manual prompt on a split's facts, once per loaded model (the cells of a sweep share it)."""
    key = ("manual", relation, split, manual.template.source, len(facts))
    if key not in loaded.memo:
        loaded.memo[key] = evaluate_facts(loaded.backend, None, manual, facts, candidates, batch_size)
    return loaded.memo[key]


def prepare_fit(loaded: LoadedModel, relation_id: str, template: Template, method: str, options, fit_config,
                split: str, *, strict: bool = False, desc: str = "", log_dir: Path | None = None,
                log_name: str = "train_log.jsonl", batch_size: int = 128) -> Prepared | CellOutput:
    """A relation's fit task and what testing it needs; a CellOutput (warnings, no files) when it is skipped.

    Facts longer than the model's context are dropped (a warning says so); `log_dir`: where train_log.jsonl streams
    (on a Ray worker, a scratch folder instead, returned with the files)."""
    backend, data = loaded.backend, loaded.data
    relation = data.relation(relation_id)
    candidates = loaded.candidates.for_relation(relation.id)
    compiled = compile_template(template, backend.tokenizer, backend.kind, manual=relation.template)
    manual = compile_template(relation.template, backend.tokenizer, backend.kind)
    method_cls = get_method(method)
    method_cls.check_template(compiled)
    warnings: list[str] = []
    train, not_candidates = loaded.facts(relation, "train")
    train, long = facts_in_context(loaded, relation, compiled, train, candidates, warnings)
    if not train:
        why = dropped_line({candidates.dropped_reason: not_candidates, TOO_LONG: long})
        msg = f"relation {relation.id} has no train facts left after filtering ({why})"
        if strict:
            raise DataError(msg)
        return CellOutput(warnings=[*warnings, f"{msg}; skipped"])
    dev, _ = loaded.facts(relation, "dev")
    dev, _ = facts_in_context(loaded, relation, compiled, dev or train, candidates, warnings)
    dev = dev or train
    test, dropped = loaded.facts(relation, split, strict)
    drops = {candidates.dropped_reason: dropped, TOO_LONG: 0}
    for t in (compiled, manual):
        test, long = facts_in_context(loaded, relation, t, test, candidates, warnings)
        drops[TOO_LONG] += long
    if not test:
        return CellOutput(warnings=[*warnings, f"relation {relation.id} has no {split} facts left after filtering; "
                                               "skipped"])
    warnings += single_candidate_warning(relation.id, candidates)
    scratch, log_path = None, None
    if log_dir is not None or loaded.remote:
        scratch = tempfile.mkdtemp(prefix="probe-train-") if loaded.remote else None
        log_path = Path(scratch or log_dir) / log_name
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
    # the manual prompt's dev figures: what a trained prompt is retried, then flagged, for staying below
    manual_dev = _manual_eval(loaded, relation.id, "dev", manual, dev, candidates, batch_size).metrics
    task = FitTask(compiled, train, dev, candidates, fit_config, method_cls, options, relation.template, log_path,
                   desc or relation.id, relation.id, manual_dev)
    return Prepared(task, test, drops, manual, warnings, scratch, template)


def finish_fit(loaded: LoadedModel, prepared: Prepared, fitted: Fitted, *, fallback: str | None = None,
             save_model: bool = False, batch_size: int = 128) -> Tested:
    """Test a fitted prompt next to the manual prompt (the prompt released once read); what the relation made."""
    backend, task = loaded.backend, prepared.task
    relation = loaded.data.relation(task.relation)
    compiled, candidates, dev, test = task.compiled, task.candidates, task.dev, prepared.test
    prompt, result = fitted.prompt, fitted.result
    source = prepared.template.source if prepared.template is not None else compiled.template.source
    try:
        evaluation = evaluate_facts(backend, prompt, compiled, test, candidates, batch_size)
        files = [("train_log.jsonl", task.log_path.read_bytes())] if task.log_path is not None else []
        if not prompt.trains_lm:
            files.append(("prompt.safetensors", prompt_bytes(prompt)))
        elif save_model:
            files.append(("model.safetensors", safetensors_bytes(prompt.lm_state())))
        saved_info = prompt.saved_info(compiled)
        method_config = dataclasses.asdict(prompt.config)
    finally:
        prompt.release()  # the next relation starts from the LM as it was
        if prepared.scratch:
            shutil.rmtree(prepared.scratch, ignore_errors=True)
    manual_test_eval = _manual_eval(loaded, relation.id, "test", prepared.manual, test, candidates, batch_size)
    manual_dev, manual_test = task.baseline, manual_test_eval.metrics
    # a kept prompt below the manual prompt on dev is flagged; with fallback manual, the manual prompt is kept
    below = result.best_dev["p1"] < manual_dev["p1"]
    fell_back = below and fallback == "manual"
    kept_eval = manual_test_eval if fell_back else evaluation
    if fell_back:
        files = [f for f in files if f[0] not in ("prompt.safetensors", "model.safetensors")]
        files.append(("prompt.safetensors", prompt_bytes(FixedPrompt(torch.zeros(0, backend.hidden_size)))))
    config = {
        "relation": relation.id,
        "method": task.method.name,
        "method_config": method_config,
        "template": relation.template if fell_back else source,
        "manual_template": relation.template,
        "n_virtual": 0 if fell_back else compiled.n_virtual,
        "hidden_size": backend.hidden_size,
        "train": dataclasses.asdict(task.config),
        "n_train": len(task.train),
        "n_dev": len(dev),
        "best_step": result.best_step,
        "steps": result.steps,
        "torch_threads": torch.get_num_threads(),  # CPU sums, so a fit's path, depend on it (in process or on Ray)
        **({"attempts": result.attempts} if result.attempts else {}),
        **({"kept": "manual", "trained_template": source} if fell_back else saved_info),
    }
    metrics = {
        **relation_row(relation),
        "n_facts": len(test), "n_dropped": sum(prepared.dropped.values()), **candidate_counts(candidates, prepared.dropped),
        "template": relation.template if fell_back else source,
        **kept_eval.metrics,
        **{f"dev_{k}": v for k, v in (manual_dev if fell_back else result.best_dev).items()},
        **{f"manual_{k}": v for k, v in manual_test.items()},
        **{f"manual_dev_{k}": v for k, v in manual_dev.items()},
        "fit_failed": result.failed,  # dev never rose above the untrained prompt's: not a trained prompt
        "below_manual": below,  # the trained prompt's dev P@1 is below the manual prompt's
        **({"kept": "manual", **{f"trained_{k}": v for k, v in evaluation.metrics.items()},
            **{f"trained_dev_{k}": v for k, v in result.best_dev.items()}} if fell_back else {}),
    }
    warnings = list(prepared.warnings)
    if result.failed:
        warnings.append(f"{relation.id}: dev P@1 never rose above its start in {len(result.attempts) or 1} "
                        "attempt(s); flagged as fit_failed, not a trained prompt")
    if below:
        warnings.append(f"{relation.id}: the trained prompt's dev P@1 {result.best_dev['p1']:.1f} is below the "
                        f"manual prompt's {manual_dev['p1']:.1f}; flagged below_manual"
                        + ("; the manual prompt is kept (--fallback manual)" if fell_back else ""))
    message = (
        f"{relation.id:>6} {relation.label[:28]:28} dev P@1 {result.best_dev['p1']:5.1f} "
        f"(manual {manual_dev['p1']:5.1f})  test P@1 {evaluation.metrics['p1']:5.1f} "
        f"(manual {manual_test['p1']:5.1f})  P@10 {evaluation.metrics['p10']:5.1f}  MRR {evaluation.metrics['mrr']:.3f}"
        + ("  [below manual on dev" + (": manual kept]" if fell_back else "]") if below else "")
    )
    return Tested(metrics, config, files, kept_eval, warnings, message)
