"""`probe train`: fit one prompt per relation against the frozen LM, then test it next to the manual prompt."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from probe.batching import relation_facts
from probe.cells import CellOutput, LoadedModel, ModelSpec
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
)
from probe.commands.eval import RelationCell, single_candidate_warning
from probe.controls import CONTROLS, get_control
from probe.data import Fact
from probe.errors import ProbeError
from probe.evaluate import evaluate_facts
from probe.fit import FitTask, Fitted, config_fields, fit
from probe.methods import FixedPrompt, get_method, method_config, parse_options
from probe.options import (
    RUN_FLAGS,
    Options,
    candidate_choice,
    check_new_folder,
    check_pack,
    check_templates,
    load_data,
    load_template_spec,
    make_executor,
    model_names,
    relation_ids,
)
from probe.pack import default_pack, packed
from probe.runs import RunConfig, RunFolder
from probe.saved_prompts import prompt_bytes, safetensors_bytes
from probe.template_files import TemplateFile
from probe.templates import CompiledTemplate, Template, compile_template
from probe.tracking import check_report_to, reported

TRAIN_FLAGS = RUN_FLAGS | {"template", "init", "reparam", "option", "train_facts", "dev_facts", "dev_split",
                           "manual_template", "save_model", "pack", "fallback", "preset", "report_to"}
FALLBACKS = ("manual",)
FIT_FLAGS = {"lr", "epochs", "min_steps", "batch_size", "eval_every", "patience", "max_train", "seed", "iterations",
             "top_k", "capitals", "dev_size"}


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
        backend, data = loaded.backend, loaded.data
        relation = data.relation(self.key)
        candidates = loaded.candidates.for_relation(relation.id)
        compiled = compile_template(self.template, backend.tokenizer, backend.kind, manual=relation.template)
        manual = compile_template(relation.template, backend.tokenizer, backend.kind)
        warnings: list[str] = []
        train, _ = loaded.facts(relation, "train")
        train, _ = facts_in_context(loaded, relation, compiled, train, candidates, warnings)
        if not train:
            msg = f"relation {relation.id} has no train facts left after filtering by the candidate vocabulary"
            if self.strict:
                raise ProbeError(msg)
            return CellOutput(warnings=[*warnings, f"{msg}; skipped"])
        dev, _ = loaded.facts(relation, "dev")
        dev, _ = facts_in_context(loaded, relation, compiled, dev or train, candidates, warnings)
        dev = dev or train
        test, dropped = loaded.facts(relation, self.split, self.strict)
        for template in (compiled, manual):
            test, long = facts_in_context(loaded, relation, template, test, candidates, warnings)
            dropped += long
        if not test:
            return CellOutput(warnings=[*warnings, f"relation {relation.id} has no {self.split} facts left after "
                                                   "filtering; skipped"])
        warnings += single_candidate_warning(relation.id, candidates)
        # the log streams into the run folder in process (to follow it), into scratch on a Ray worker
        scratch = tempfile.mkdtemp(prefix="probe-train-") if loaded.remote else None
        log_path = Path(scratch or Path(self.root) / relation.id) / "train_log.jsonl"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        # the manual prompt's dev figures: what a trained prompt is retried, then flagged, for staying below
        manual_dev = evaluate_facts(backend, None, manual, dev, candidates, self.batch_size).metrics
        task = FitTask(compiled, train, dev, candidates, self.fit_config, get_method(self.method), self.options,
                       relation.template, log_path, f"{relation.id} {self.position}", relation.id, manual_dev)
        return Prepared(task, test, dropped, manual, warnings, scratch)

    def finish(self, loaded: LoadedModel, prepared: Prepared, fitted: Fitted) -> CellOutput:
        """Test a fitted prompt next to the manual prompt; the relation's files (the prompt released once read)."""
        backend, task = loaded.backend, prepared.task
        relation = loaded.data.relation(self.key)
        compiled, candidates, dev, test = task.compiled, task.candidates, task.dev, prepared.test
        prompt, result = fitted.prompt, fitted.result
        try:
            evaluation = evaluate_facts(backend, prompt, compiled, test, candidates, self.batch_size)
            files = [("train_log.jsonl", task.log_path.read_bytes())]
            if not prompt.trains_lm:
                files.append(("prompt.safetensors", prompt_bytes(prompt)))
            elif self.save_model:
                files.append(("model.safetensors", safetensors_bytes(prompt.lm_state())))
            saved_info = prompt.saved_info(compiled)
        finally:
            prompt.release()  # the next relation starts from the LM as it was
            if prepared.scratch:
                shutil.rmtree(prepared.scratch, ignore_errors=True)
        manual_test_eval = evaluate_facts(backend, None, prepared.manual, test, candidates, self.batch_size)
        manual_dev, manual_test = task.baseline, manual_test_eval.metrics
        # a kept prompt below the manual prompt on dev is flagged; with --fallback manual, the manual prompt is kept
        below = result.best_dev["p1"] < manual_dev["p1"]
        fell_back = below and self.fallback == "manual"
        kept_eval = manual_test_eval if fell_back else evaluation
        if fell_back:
            files = [f for f in files if f[0] not in ("prompt.safetensors", "model.safetensors")]
            files.append(("prompt.safetensors", prompt_bytes(FixedPrompt(torch.zeros(0, backend.hidden_size)))))
        config = {
            **self.run_info,
            "relation": relation.id,
            "method": self.method,
            "method_config": dataclasses.asdict(prompt.config),
            "template": relation.template if fell_back else self.template.source,
            "manual_template": relation.template,
            "n_virtual": 0 if fell_back else compiled.n_virtual,
            "hidden_size": backend.hidden_size,
            "train": dataclasses.asdict(self.fit_config),
            "n_train": len(task.train),
            "n_dev": len(dev),
            "best_step": result.best_step,
            "steps": result.steps,
            "torch_threads": torch.get_num_threads(),  # CPU sums, so a fit's path, depend on it (in process or on Ray)
            **({"attempts": result.attempts} if result.attempts else {}),
            **({"kept": "manual", "trained_template": self.template.source} if fell_back else saved_info),
        }
        metrics = {
            **relation_row(relation),
            "n_facts": len(test), "n_dropped": prepared.dropped, **candidate_counts(candidates, prepared.dropped),
            "template": relation.template if fell_back else self.template.source,
            **kept_eval.metrics,
            **{f"dev_{k}": v for k, v in (manual_dev if fell_back else result.best_dev).items()},
            **{f"manual_{k}": v for k, v in manual_test.items()},
            **{f"manual_dev_{k}": v for k, v in manual_dev.items()},
            "fit_failed": result.failed,  # dev never rose above the untrained prompt's: not a trained prompt
            "below_manual": below,  # the trained prompt's dev P@1 is below the manual prompt's
            **({"kept": "manual", **{f"trained_{k}": v for k, v in evaluation.metrics.items()},
                **{f"trained_dev_{k}": v for k, v in result.best_dev.items()}} if fell_back else {}),
        }
        files.append(("config.json", (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()))
        output = relation_output(relation.id, metrics, kept_eval.predictions(), tuple(files))
        output.warnings = list(prepared.warnings)
        if result.failed:
            output.warnings.append(f"{relation.id}: dev P@1 never rose above its start in {len(result.attempts) or 1} "
                                   "attempt(s); flagged as fit_failed, not a trained prompt")
        if below:
            output.warnings.append(f"{relation.id}: the trained prompt's dev P@1 {result.best_dev['p1']:.1f} is below the "
                                   f"manual prompt's {manual_dev['p1']:.1f}; flagged below_manual"
                                   + ("; the manual prompt is kept (--fallback manual)" if fell_back else ""))
        output.message = (
            f"{relation.id:>6} {relation.label[:28]:28} dev P@1 {result.best_dev['p1']:5.1f} "
            f"(manual {manual_dev['p1']:5.1f})  test P@1 {evaluation.metrics['p1']:5.1f} "
            f"(manual {manual_test['p1']:5.1f})  P@10 {evaluation.metrics['p10']:5.1f}  MRR {evaluation.metrics['mrr']:.3f}"
            + ("  [below manual on dev" + (": manual kept]" if fell_back else "]") if below else "")
        )
        return output

    def run(self, loaded: LoadedModel) -> CellOutput:
        prepared = self.prepare(loaded)
        if isinstance(prepared, CellOutput):
            return prepared
        return self.finish(loaded, prepared, fit(loaded.backend, prepared.task))


@dataclass
class Prepared:
    """A relation ready to fit: its task, its test facts (and how many were dropped), the manual template it is tested
    next to, warnings for the user, and a scratch folder to remove once finished (Ray workers)."""

    task: FitTask
    test: list[Fact]
    dropped: int
    manual: CompiledTemplate
    warnings: list[str]
    scratch: str | None = None


def fittable_method(name: str):
    """The class of a method that can be trained; one that cannot is a ProbeError."""
    method_cls = get_method(name)
    if not method_cls.can_fit():
        raise ProbeError(f"method {name!r} has nothing to train: use `probe eval --method {name}`")
    return method_cls


def method_options(opts: Options, method: str):
    """The method's options from --init, --reparam and --option NAME=VALUE, checked by the method."""
    given = parse_options(opts.option)
    for name in ("init", "reparam"):
        value = getattr(opts, name)
        if value is not None:
            if name in given:
                raise ProbeError(f"--{name} is given twice (also as --option {name}=...)")
            given[name] = value
    return method_config(method, **given)


def compiled_templates(model, data, ids: list[str], method: str, options, templates: TemplateFile) -> dict:
    """(template, compiled) per relation for a method, on the model's tokenizer (a ModelInfo or a Backend): every
    template is checked before any folder is made or any training starts."""
    method_cls = fittable_method(method)
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


def run_train(opts: Options, log=print) -> list[RunResult]:
    """`probe train`: fit one prompt per relation against the frozen LM, then test it next to the manual prompt."""
    t0 = time.time()
    method = opts.method or "ptuning"
    method_cls = fittable_method(method)
    fit_fields = config_fields(method_cls.fit_config_class)
    opts.refuse(TRAIN_FLAGS | (FIT_FLAGS & fit_fields), f"method {method!r}")
    control = get_control(opts.control)
    if not control.trainable:
        trainable = ", ".join(n for n, c in CONTROLS.items() if c.trainable)
        raise ProbeError(f"--control {control.name!r} does not apply to `probe train`: expected one of {trainable}")
    (name,) = model_names(opts, several=False)
    options = method_options(opts, method)
    method_cls.check_settings(options, opts.template is not None)
    if opts.fallback is not None and opts.fallback not in FALLBACKS:
        raise ProbeError(f"--fallback {opts.fallback!r}: expected {' or '.join(FALLBACKS)} (the relation's manual prompt "
                         "where the trained one is below it on dev)")
    if opts.save_model and not method_cls.trains_lm:
        raise ProbeError(f"--save-model applies to methods that train the LM's weights; {method!r} trains a prompt, "
                         "which every run saves")
    dtype = opts.dtype
    if method_cls.lm_dtype is not None:
        if dtype not in (None, method_cls.lm_dtype):
            raise ProbeError(f"method {method!r} trains the LM's weights in {method_cls.lm_dtype}: --dtype {dtype} does "
                             "not apply")
        dtype = method_cls.lm_dtype
    fit_config = method_cls.fit_config(opts.preset, **{k: getattr(opts, k) for k in FIT_FLAGS & fit_fields})
    check_pack(opts.pack, method_cls)
    if (opts.jobs or 1) > 1 and not method_cls.beside_others:
        raise ProbeError(f"--jobs runs fits beside each other on one LM; method {method!r} changes the LM while it fits, "
                         "so its relations run one after another (leave --jobs out)")
    templates = load_template_spec(opts.template, method)
    trackers = check_report_to(opts.report_to)
    check_new_folder(opts.out, opts.resume)
    data = load_data(opts, opts.manual_template, fit_config.seed)
    split = data.split_name(opts.split)
    if split not in data.test_splits:
        raise ProbeError(f"--split {split!r}: a trained prompt is tested on {' or '.join(data.test_splits)}, never on "
                         "train or dev")
    ids = relation_ids(data, opts.relation, opts.all)
    check_templates(data, ids, "--manual-template")
    choice = candidate_choice(opts)
    seed = fit_config.seed
    executor = make_executor(data, choice, opts.ray, opts.cpus_per_worker, opts.threads, log, opts.jobs)
    try:
        spec, info = open_model(name, opts.device, dtype, executor, control, seed, opts.max_memory)
        candidates = choice.build(info.tokenizer, data)
        objects, n_candidates, n_source = describe_candidates(choice, candidates, info.kind, ids)
        if len(ids) == 1:
            rel = data.relation(ids[0])
            if not relation_facts(data, rel, "train", candidates, strict=False)[0]:
                raise ProbeError(f"relation {rel.id} has no train facts left after filtering by the candidate vocabulary")
            relation_facts(data, rel, split, candidates, strict=True)
        config = RunConfig.of(
            "train", info, data, n_candidates=n_candidates, n_vocab_words=n_source, objects=objects or None,
            method=method, split=split, vocab=choice.vocab, batch_size=128, device=spec.device,
            template_file=opts.template, seed=seed, method_config=dataclasses.asdict(options),
            train=dataclasses.asdict(fit_config), torch_threads=executor.threads,
            pack=(opts.pack or default_pack(spec.device)) if method_cls.packable else None, fallback=opts.fallback,
        )
        run = RunFolder(opts.out or default_out(method + ("-any" if choice.objects else ""), info.name), config.to_dict(),
                        resume=bool(opts.resume))
        executor = reported(executor, trackers, run.root, run.config)
        cells = train_cells(spec, info, data, ids, run, method, options, fit_config, templates, split, bool(opts.save_model),
                            opts.fallback)
        if method_cls.packable:
            cells = packed(cells, config.pack)
    except BaseException:
        executor.close()
        raise
    log(candidates_line(info, spec.dtype, choice, objects, n_candidates, n_source))
    (results,) = execute(executor, [run], cells, "train", log)
    return [RunResult(run, results, time.time() - t0)]


def train_cells(spec: ModelSpec, model, data, ids: list[str], run: RunFolder, method: str, options, fit_config,
                templates: TemplateFile, split: str, save_model: bool = False, fallback: str | None = None) -> list[TrainCell]:
    """One cell per unfinished relation of a run folder; every template is checked (on `model`'s tokenizer) first."""
    todo = [r for r in ids if not run.is_done(r)]
    templates_of = compiled_templates(model, data, todo, method, options, templates)
    run_info = {k: run.config[k] for k in ("probe_version", "model", "model_kind", "data", "vocab", "split")}
    return [TrainCell(rid, spec, run.root, method, options, fit_config, templates_of[rid][0], split, run_info,
                      len(ids) == 1, f"[{i}/{len(todo)}]", save_model=save_model, fallback=fallback)
            for i, rid in enumerate(todo, 1)]
