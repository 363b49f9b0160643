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
    RunResult,
    candidate_counts,
    candidates_line,
    default_out,
    describe_candidates,
    execute,
    facts_in_context,
    open_model,
    relation_output,
    relation_row,
    run_folder_for,
)
from probe.controls import CONTROLS, get_control
from probe.errors import ProbeError, check_positive
from probe.evaluate import evaluate_ensemble, evaluate_fixed
from probe.methods import get_method
from probe.options import (
    RUN_FLAGS,
    Options,
    candidate_choice,
    check_model_slugs,
    check_new_folder,
    check_templates,
    load_data,
    make_executor,
    model_names,
    relation_ids,
)
from probe.prompt_files import DiscretePrompt, read_prompts
from probe.runs import RunConfig, RunFolder, slug
from probe.templates import ClozeTemplate, compile_template

EVAL_FLAGS = RUN_FLAGS | {"batch_size", "seed", "prompts_file", "ensemble", "max_prompts", "template", "from_sentences",
                        "score"}
PROMPT_FLAGS = {"method", "prompts_file", "ensemble", "max_prompts", "template", "from_sentences"}


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
        if self.from_sentences:
            with_sentence = [f for f in facts if f.sentence]
            facts, dropped = with_sentence, dropped + len(facts) - len(with_sentence)
        warnings: list[str] = []
        if control.uses_lm:
            chosen = self.prompts or [DiscretePrompt(relation.template, None, "manual")]
            compiled = ([ClozeTemplate.compile(backend.tokenizer, backend.kind)] if self.from_sentences else
                        [compile_template(p.template, backend.tokenizer, backend.kind) for p in chosen])
            for template in compiled:
                facts, long = facts_in_context(loaded, relation, template, facts, candidates, warnings)
                dropped += long
        if not facts:
            return CellOutput(warnings=[*warnings, f"{relation.id} has no {self.split} facts left after filtering; skipped"])
        warnings += single_candidate_warning(relation.id, candidates)
        base = {**relation_row(relation), "n_dropped": dropped, "n_facts": len(facts), **candidate_counts(candidates, dropped)}
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


def run_eval(opts: Options, log=print) -> list[RunResult]:
    """`probe eval`: fixed prompts (manual, a prompts file) or a control on the relations asked for, for one model or
    several (one run folder each). Every check runs before a folder is made."""
    t0 = time.time()
    if opts.prompts is not None:
        raise ProbeError("internal: saved prompts go through rerun_prompts")
    from probe.commands.statements import run_statement_eval, score_choice

    if score_choice(opts) == "statement":
        return run_statement_eval(opts, log)
    opts.refuse(EVAL_FLAGS, "`probe eval`")
    control = get_control(opts.control)
    method = opts.method or "manual"
    if method in CONTROLS:
        raise ProbeError(f"{method} is a control, not a method: use --control {method}")
    method_cls = get_method(method)
    if method_cls.can_fit():
        raise ProbeError(f"method {method!r} is trained: use `probe train --method {method}`, then `probe eval --prompts RUN`")
    if not control.uses_lm:
        opts.refuse(EVAL_FLAGS - PROMPT_FLAGS - {"seed"}, f"--control {control.name} ({control.summary}, with no prompt)")
    if opts.seed is not None and not control.seeded:
        seeded = " or ".join(n for n, c in CONTROLS.items() if c.seeded)
        raise ProbeError(f"--seed applies to --control {seeded} only (a fixed prompt has nothing random)")
    seed = (13 if opts.seed is None else opts.seed) if control.seeded else None
    if opts.prompts_file is None and (opts.ensemble or opts.max_prompts is not None):
        raise ProbeError("--ensemble and --max-prompts need --prompts-file")
    max_prompts = opts.max_prompts if opts.max_prompts is not None else (0 if opts.ensemble else 1)
    if max_prompts < 0 or (max_prompts != 1 and not opts.ensemble):
        raise ProbeError(f"--max-prompts {max_prompts}: several prompts per relation need --ensemble (0 means all)")
    batch_size = 128 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    if opts.from_sentences and (opts.prompts_file is not None or opts.template is not None):
        raise ProbeError("--from-sentences evaluates each fact's cloze sentence: it does not go with --template or "
                         "--prompts-file")
    names = model_names(opts, several=True)
    several = len(names) > 1
    out = opts.out
    if several:  # one parent folder, a run folder per model in it
        check_model_slugs(names, "given with --model")
        out = out or default_out(opts.method or opts.control or "manual", "models")
        check_new_folder(out, True)
        for name in names:
            check_new_folder(Path(out) / slug(name), opts.resume)
    else:
        check_new_folder(out, opts.resume)
    data = load_data(opts, opts.template)
    ids = relation_ids(data, opts.relation, opts.all)
    split = data.split_name(opts.split)
    if not opts.from_sentences and opts.prompts_file is None and control.uses_lm:
        check_templates(data, ids, "--template")
    choice = candidate_choice(opts)
    if choice.objects is None:
        data.vocab_words(choice.vocab)  # checks the vocabulary name
    chosen, prompts_info = None, {}
    if opts.prompts_file is not None:
        prompt_set = read_prompts(opts.prompts_file)
        prompt_set.check_relations(data.relations)
        chosen = prompt_set.chosen(ids, max_prompts, strict=bool(opts.relation))
        if not chosen:
            raise ProbeError(f"prompts file {opts.prompts_file} has no prompt for the relations asked for")
        if len(chosen) < len(ids):
            log(f"warning: no prompt in {opts.prompts_file} for {', '.join(r for r in ids if r not in chosen)}; skipped")
        ids = list(chosen)
        method = "discrete"
        prompts_info = {"prompts_file": str(Path(opts.prompts_file).resolve()), "prompts_format": prompt_set.format,
                        "ensemble": bool(opts.ensemble), "prompts_per_relation": {r: len(p) for r, p in chosen.items()}}
    if not control.uses_lm:
        method = None
    executor = make_executor(data, choice, opts.ray, opts.cpus_per_worker, opts.threads, log, opts.jobs)
    name = f"discrete-{slug(Path(opts.prompts_file).stem)}" if chosen else (method or control.name)
    name += "-cloze" if opts.from_sentences else ""
    name += "-any" if choice.objects else ""
    runs, cells = [], []
    try:
        for model in names:
            spec, info = open_model(model, opts.device, opts.dtype, executor, control, seed, opts.max_memory)
            candidates = choice.build(info.tokenizer, data)
            objects, n_candidates, n_source = describe_candidates(choice, candidates, info.kind, ids)
            if control.uses_lm:  # every template compiles for this tokenizer before a folder is made
                check_compiles(info, data, ids, chosen, bool(opts.from_sentences))
            if len(ids) == 1:
                relation_facts(data, data.relation(ids[0]), split, candidates, strict=True)
            log(candidates_line(info, spec.dtype, choice, objects, n_candidates, n_source))
            config = RunConfig.of(
                "eval", info, data, n_candidates=n_candidates, n_vocab_words=n_source, objects=objects or None,
                method=method, split=split, vocab=choice.vocab, batch_size=batch_size, control=control.name,
                template_file=str(opts.prompts_file) if opts.prompts_file is not None else None,
                seed=seed, device=spec.device, torch_threads=executor.threads,
                method_config={"ensemble": bool(opts.ensemble), "max_prompts": max_prompts} if chosen else None,
                prompts=prompts_info, from_sentences=bool(opts.from_sentences) or None, score="object",
            )
            run = run_folder_for(out, name, info.name, several, config.to_dict(), bool(opts.resume))
            runs.append(run)
            cells += eval_cells(spec, run, ids, split, batch_size, chosen, control.name, bool(opts.from_sentences))
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
