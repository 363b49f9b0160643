"""`probe train`: fit one prompt per relation against the frozen LM, then test it next to the manual prompt."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from probe.batching import relation_facts
from probe.cells import CellOutput, LoadedModel, ModelSpec
from probe.commands.common import (
    RunResult,
    candidates_line,
    default_out,
    describe_candidates,
    execute,
    open_model,
    relation_output,
)
from probe.commands.eval import RelationCell
from probe.commands.fit_cell import Prepared, finish_fit, prepare_fit
from probe.errors import DataError
from probe.fit import Fitted, fit
from probe.methods import get_method
from probe.options import Options, make_executor
from probe.pack import default_pack, packed
from probe.runs import RunConfig, RunFolder
from probe.spec import TRAIN_FLAGS, RunSpec, fittable_method, given_settings, resolve_train  # noqa: F401 (there before)
from probe.template_files import TemplateFile
from probe.templates import Template, compile_template
from probe.tracking import reported


@dataclass
class TrainCell(RelationCell):
    """One relation's prompt: fit on train with selection on dev, then tested next to the manual prompt."""

    method: str
    options: object  # the method's MethodConfig
    fit_config: object
    template: Template
    split: str
    run_info: dict  # what the relation's config.json repeats of the run's
    strict: bool = False
    position: str = ""  # "[3/41]" in the progress bar
    batch_size: int = 128
    save_model: bool = False  # methods that train the LM: its weights in model.safetensors
    fallback: str | None = None  # "manual": a prompt below the manual one on dev gives way to the manual prompt

    @property
    def beside_others(self) -> bool:
        return get_method(self.method).beside_others

    def prepare(self, loaded: LoadedModel) -> Prepared | CellOutput:
        """The relation's fit task and what testing it needs; a CellOutput instead when the relation is skipped."""
        return prepare_fit(loaded, self.key, self.template, self.method, self.options, self.fit_config, self.split,
                           strict=self.strict, desc=f"{self.key} {self.position}", log_dir=Path(self.root) / self.key,
                           batch_size=self.batch_size)

    def finish(self, loaded: LoadedModel, prepared: Prepared, fitted: Fitted) -> CellOutput:
        """Test a fitted prompt next to the manual prompt; the relation's files."""
        tested = finish_fit(loaded, prepared, fitted, fallback=self.fallback, save_model=self.save_model,
                          batch_size=self.batch_size)
        config = {**self.run_info, **tested.config}
        files = [*tested.files, ("config.json", (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())]
        output = relation_output(self.key, tested.metrics, tested.evaluation.predictions(), tuple(files))
        output.warnings = tested.warnings
        output.message = tested.message
        return output

    def run(self, loaded: LoadedModel) -> CellOutput:
        prepared = self.prepare(loaded)
        if isinstance(prepared, CellOutput):
            return prepared
        return self.finish(loaded, prepared, fit(loaded.backend, prepared.task))


def compiled_templates(model, data, ids: list[str], method: str, options, templates: TemplateFile) -> dict:
    """(template, compiled) per relation for a method, on the model's tokenizer (a ModelInfo or a Backend): every
    template is checked before any folder is made or any training starts."""
    method_cls = get_method(method)  # a resolved spec's method, checked fittable there
    out = {}
    for rid in ids:
        relation = data.relation(rid)
        template = method_cls.relation_template(templates.template_for(rid, model.kind), relation.template, model.kind,
                                                options)
        compiled = compile_template(template, model.tokenizer, model.kind, manual=relation.template)
        method_cls.check_template(compiled)
        compile_template(relation.template, model.tokenizer, model.kind)  # the manual baseline it is tested next to
        out[rid] = (template, compiled)
    return out


def run_train(opts: Options, log=print, loaded=None) -> list[RunResult]:
    """`probe train`: fit one prompt per relation against the frozen LM, then test it next to the manual prompt."""
    return train_run(resolve_train(opts), log, loaded)


def train_run(run_spec: RunSpec, log=print, loaded=None) -> list[RunResult]:
    """Run a resolved `probe train` (`loaded(data, candidates)`: the Python API's model, already loaded)."""
    t0 = time.time()
    fit_spec, data, ids, split, choice = run_spec.fit, run_spec.data, list(run_spec.relations), run_spec.split, \
        run_spec.candidates
    method, seed = fit_spec.method, fit_spec.fit_config.seed
    method_cls = get_method(method)
    overlap = data.overlap(ids, split)
    executor = make_executor(data, choice, run_spec.ray, run_spec.cpus_per_worker, run_spec.threads, log, run_spec.jobs)
    if loaded is not None:
        executor.loaded = loaded(data, choice)
    try:
        spec, info = open_model(run_spec.model, run_spec.device, run_spec.dtype, executor, run_spec.control, seed,
                                run_spec.max_memory)
        candidates = choice.build(info.tokenizer, data)
        objects, n_candidates, n_source = describe_candidates(choice, candidates, info.kind, ids)
        if len(ids) == 1:
            rel = data.relation(ids[0])
            if not relation_facts(data, rel, "train", candidates, strict=False)[0]:
                raise DataError(f"relation {rel.id} has no train facts left after filtering by the candidate vocabulary")
            relation_facts(data, rel, split, candidates, strict=True)
        config = RunConfig.of(
            "train", info, data, n_candidates=n_candidates, n_vocab_words=n_source, objects=objects or None,
            method=method, split=split, vocab=choice.vocab, batch_size=128, device=spec.device,
            template_file=run_spec.template_file, seed=seed, method_config=dataclasses.asdict(fit_spec.config),
            train=dataclasses.asdict(fit_spec.fit_config), torch_threads=executor.threads,
            pack=(run_spec.pack or default_pack(spec.device)) if method_cls.packable else None,
            fallback=fit_spec.fallback, overlap=overlap or None, allow_overlap=run_spec.allow_overlap or None,
        )
        run = RunFolder(run_spec.out or default_out(method + ("-any" if choice.objects else ""), info.name),
                        config.to_dict(), resume=run_spec.resume)
        executor = reported(executor, list(run_spec.report_to), run.root, run.config)
        cells = train_cells(spec, info, data, ids, run, method, fit_spec.config, fit_spec.fit_config,
                            fit_spec.templates, split, run_spec.save_model, fit_spec.fallback)
        if method_cls.packable:
            cells = packed(cells, config.pack)
    except BaseException:
        executor.close()
        raise
    log(candidates_line(info, spec.dtype, choice, objects, n_candidates, n_source))
    if overlap and not run_spec.allow_overlap:
        log(overlap_warning(overlap, split))
    (results,) = execute(executor, [run], cells, "train", log)
    return [RunResult(run, results, time.time() - t0)]


def overlap_warning(overlap: dict[str, dict[str, int]], split: str) -> str:
    """One line: how many test facts are also train or dev facts, in which relations."""
    shared = sum(o["shared"] for o in overlap.values())
    shown = ", ".join(f"{rid} {o['shared']} of {o['test']}" for rid, o in list(overlap.items())[:8])
    more = f" and {len(overlap) - 8} more" if len(overlap) > 8 else ""
    return (f"warning: {shared:,} {split} facts are also train or dev facts ({shown}{more}): their figures are not "
            "held out; pass --allow-overlap to accept this (recorded in config.json)")


def train_cells(spec: ModelSpec, model, data, ids: list[str], run: RunFolder, method: str, options, fit_config,
                templates: TemplateFile, split: str, save_model: bool = False, fallback: str | None = None) -> list[TrainCell]:
    """One cell per unfinished relation of a run folder; every template is checked (on `model`'s tokenizer) first."""
    todo = [r for r in ids if not run.is_done(r)]
    templates_of = compiled_templates(model, data, todo, method, options, templates)
    run_info = {k: run.config[k] for k in ("probe_version", "model", "model_kind", "data", "vocab", "split")}
    return [TrainCell(rid, spec, run.root, method, options, fit_config, templates_of[rid][0], split, run_info,
                      len(ids) == 1, f"[{i}/{len(todo)}]", save_model=save_model, fallback=fallback)
            for i, rid in enumerate(todo, 1)]
