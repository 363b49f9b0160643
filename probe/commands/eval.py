"""`probe eval`: fixed prompts (the manual template, a prompts file, cloze sentences) or a control, on the relations
asked for, for one model or several (one run folder each)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from probe.batching import relation_facts
from probe.cells import Cell, CellOutput, LoadedModel, ModelSpec
from probe.commands.common import (
    TOO_LONG,
    RunResult,
    candidate_counts,
    candidates_line,
    describe_candidates,
    dropped_line,
    execute,
    facts_in_context,
    open_model,
    relation_output,
    relation_row,
    run_folder_for,
)
from probe.controls import get_control
from probe.evaluator import evaluate_ensemble, evaluate_fixed
from probe.options import Options, make_executor
from probe.prompt_files import DiscretePrompt
from probe.runs import RunConfig, RunFolder
from probe.spec import EVAL_FLAGS, PROMPT_FLAGS, EvalSpec, resolve_eval  # noqa: F401 (flags: there before)
from probe.templates import ClozeTemplate, compile_template


@dataclass
class RelationCell(Cell):
    """A cell that is one relation of a run folder: its key is the relation id, its metrics.json marks it done."""

    key: str
    model: ModelSpec
    root: Path

    @property
    def marker(self) -> str:
        return f"{self.key}/metrics.json"


@dataclass
class EvalCell(RelationCell):
    """One relation evaluated with fixed prompts (its manual template, a prompts file, cloze sentences) or a control
    that scores without the LM."""

    split: str
    batch_size: int = 128
    strict: bool = False
    prompts: list[DiscretePrompt] | None = None
    control: str = "none"
    from_sentences: bool = False

    def run(self, loaded: LoadedModel) -> CellOutput:
        backend, data = loaded.backend, loaded.data
        relation = data.relation(self.key)
        candidates = loaded.candidates.for_relation(relation.id)
        control = get_control(self.control)
        facts, dropped = loaded.facts(relation, self.split, self.strict)
        drops = {candidates.dropped_reason: dropped, "facts without a cloze sentence": 0, TOO_LONG: 0}
        if self.from_sentences:
            with_sentence = [f for f in facts if f.sentence]
            facts, drops["facts without a cloze sentence"] = with_sentence, len(facts) - len(with_sentence)
        warnings: list[str] = []
        if control.uses_lm:
            chosen = self.prompts or [DiscretePrompt(relation.template, None, "manual")]
            compiled = ([ClozeTemplate.compile(backend.tokenizer, backend.kind)] if self.from_sentences else
                        [compile_template(p.template, backend.tokenizer, backend.kind) for p in chosen])
            for template in compiled:
                facts, long = facts_in_context(loaded, relation, template, facts, candidates, warnings)
                drops[TOO_LONG] += long
        if not facts:
            return CellOutput(warnings=[*warnings, f"{relation.id} has no {self.split} facts left after filtering; skipped "
                                                   f"({dropped_line(drops)})"])
        warnings += single_candidate_warning(relation.id, candidates)
        base = {**relation_row(relation), "n_dropped": sum(drops.values()), "n_facts": len(facts),
                **candidate_counts(candidates, drops)}
        if not control.uses_lm:
            train, _ = loaded.facts(relation, "train")
            result = evaluate_fixed(control.scores(train, candidates), facts, candidates)
            output = relation_output(relation.id, {**base, "n_train": len(train), **result.metrics}, result.predictions())
            output.warnings = warnings
            return output
        n_prompts = len(compiled)
        with tqdm(total=len(facts) * n_prompts, unit="fact", desc=relation.id, dynamic_ncols=True, leave=False) as bar:
            weights = [1.0 if p.weight is None else p.weight for p in chosen]
            result = evaluate_ensemble(backend, None, compiled, weights[:n_prompts], facts, candidates, self.batch_size, bar)
        template = "cloze sentences" if self.from_sentences else chosen[0].template
        metrics = {**base, "template": template, **result.metrics}
        if len(chosen) > 1:
            metrics.update(templates=[p.template for p in chosen], weights=weights)
        output = relation_output(relation.id, metrics, result.predictions())
        output.warnings = warnings
        return output


def single_candidate_warning(rid: str, candidates) -> list[str]:
    """A relation with fewer than two candidates ranks every fact first: its P@1 says nothing."""
    if len(candidates) < 2:
        return [f"{rid} has {len(candidates)} candidate(s): every fact ranks it first, so its P@1 is 100 by construction"]
    return []


def run_eval(opts: Options, log=print, loaded=None) -> list[RunResult]:
    """`probe eval`: fixed prompts (manual, a prompts file) or a control on the relations asked for, for one model or
    several (one run folder each). Every check runs before a folder is made (`resolve_eval`). A BEAR folder (or
    `--score statement`) ranks whole statements instead (probe/commands/statements.py)."""
    from probe.commands.statements import run_statement_eval, score_choice

    if opts.prompts is None and score_choice(opts) == "statement":
        return run_statement_eval(opts, log, loaded)
    return eval_run(resolve_eval(opts, log), log, loaded)


def eval_run(es: EvalSpec, log=print, loaded=None) -> list[RunResult]:
    """Run a resolved `probe eval` (`loaded(data, candidates)`: the Python API's model, already loaded)."""
    t0 = time.time()
    data, ids, split, choice, chosen, control = es.data, list(es.relations), es.split, es.candidates, es.chosen, es.control
    several = len(es.models) > 1
    executor = make_executor(data, choice, es.ray, es.cpus_per_worker, es.threads, log, es.jobs)
    if loaded is not None:  # the Python API: a model already loaded, `loaded(data, candidates)` its LoadedModel
        executor.loaded = loaded(data, choice)
    runs, cells = [], []
    try:
        for model in es.models:
            spec, info = open_model(model, es.device, es.dtype, executor, control, es.seed, es.max_memory)
            candidates = choice.build(info.tokenizer, data)
            objects, n_candidates, n_source = describe_candidates(choice, candidates, info.kind, ids)
            if control.uses_lm:  # every template compiles for this tokenizer before a folder is made
                check_compiles(info, data, ids, chosen, es.from_sentences)
            if len(ids) == 1:
                relation_facts(data, data.relation(ids[0]), split, candidates, strict=True)
            log(candidates_line(info, spec.dtype, choice, objects, n_candidates, n_source))
            config = RunConfig.of(
                "eval", info, data, n_candidates=n_candidates, n_vocab_words=n_source, objects=objects or None,
                method=es.method, split=split, vocab=choice.vocab, batch_size=es.batch_size, control=control.name,
                template_file=str(es.prompts_file) if es.prompts_file is not None else None,
                seed=es.seed, device=spec.device, torch_threads=executor.threads,
                method_config={"ensemble": es.ensemble, "max_prompts": es.max_prompts} if chosen else None,
                prompts=dict(es.prompts_info), from_sentences=es.from_sentences or None, score="object",
            )
            run = run_folder_for(es.out, es.name, info.name, several, config.to_dict(), es.resume)
            runs.append(run)
            cells += eval_cells(spec, run, ids, split, es.batch_size, chosen, control.name, es.from_sentences)
    except BaseException:
        executor.close()
        raise
    results = execute(executor, runs, cells, "eval", log)
    return [RunResult(run, res, time.time() - t0) for run, res in zip(runs, results, strict=True)]


def check_compiles(info, data, ids: list[str], chosen: dict | None, from_sentences: bool) -> None:
    """Every relation's templates compile for the model's tokenizer and kind (a causal LM needs something before [Y],
    a masked LM a mask token): a TemplateError now, not after the run folder is made."""
    if from_sentences:
        ClozeTemplate.compile(info.tokenizer, info.kind)
        return
    for rid in ids:
        templates = [p.template for p in chosen[rid]] if chosen else [data.relation(rid).template]
        for template in templates:
            compile_template(template, info.tokenizer, info.kind)


def eval_cells(spec: ModelSpec, run: RunFolder, ids: list[str], split: str, batch_size: int = 128,
               prompts: dict[str, list[DiscretePrompt]] | None = None, control: str = "none",
               from_sentences: bool = False) -> list[EvalCell]:
    """One cell per relation of a run folder."""
    return [EvalCell(rid, spec, run.root, split, batch_size, len(ids) == 1, prompts[rid] if prompts else None, control,
                     from_sentences) for rid in ids]
