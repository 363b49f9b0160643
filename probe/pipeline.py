"""Runs: the user's settings checked once, one run config built, every relation evaluated or trained into a run folder.

`run_eval`, `run_train` and `rerun_prompts` are what `probe eval` and `probe train` call. Every setting is checked
before any folder is created or any model is loaded, and a flag that does not apply to the command is an error.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from probe import __version__
from probe.backends import Backend, load_backend
from probe.batching import filter_facts
from probe.controls import CONTROLS, MODEL_CONTROLS
from probe.data import FactData, Relation, open_data, relation_key
from probe.errors import Interrupted, ProbeError, check_positive
from probe.evaluate import evaluate_ensemble, evaluate_facts, evaluate_majority
from probe.methods import FixedPrompt, get_method, method_config
from probe.methods.manual import ManualPrompt
from probe.prompt_files import DiscretePrompt, read_prompts
from probe.runs import RunFolder, atomic_write_bytes, atomic_write_json, read_json
from probe.templates import (
    DEFAULT_SHAPES,
    GOOGLE_RE_TEMPLATES,
    WORDS,
    ClozeTemplate,
    TemplateFile,
    compile_template,
    parse_template,
    parse_template_file,
    template_sources,
)
from probe.train import config_fields
from probe.vocab import CandidateVocab, build_candidates


@dataclass
class Options:
    """The flags of `probe eval` and `probe train` as the user gave them; None: not given."""

    model: str | None = None
    method: str | None = None
    relation: list[str] | None = None
    all: bool | None = None
    split: str | None = None
    vocab: str | None = None
    data: str | None = None
    out: Path | None = None
    resume: bool | None = None
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    control: str | None = None
    seed: int | None = None
    prompts: Path | None = None
    prompts_file: Path | None = None
    ensemble: bool | None = None
    max_prompts: int | None = None
    template: str | None = None
    init: str | None = None
    reparam: str | None = None
    lr: float | None = None
    epochs: int | None = None
    min_steps: int | None = None
    eval_every: int | None = None
    patience: int | None = None
    max_train: int | None = None
    iterations: int | None = None
    top_k: int | None = None
    capitals: bool | None = None
    facts: Path | None = None
    train_facts: Path | None = None
    dev_facts: Path | None = None
    fields: str | None = None
    dev_split: float | None = None
    from_sentences: bool | None = None
    manual_template: str | None = None

    def given(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None and getattr(self, f.name) != []}

    def refuse(self, allowed: set[str], where: str) -> None:
        """A given flag outside `allowed` is an error naming it and `where` it was given."""
        extra = sorted(self.given() - allowed)
        if extra:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in extra)
            raise ProbeError(f"{flags} {'does' if len(extra) == 1 else 'do'} not apply to {where}")


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
    from_sentences: bool | None = None  # cloze sentences instead of templates (causal LMs: the text before [MASK])
    probe_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    @classmethod
    def of(cls, command: str, backend: Backend, data: FactData, candidates: CandidateVocab, **fields) -> RunConfig:
        """A run config with the model, data and candidates filled in from the objects themselves."""
        return cls(command=command, model=backend.name, model_kind=backend.kind, data=data.name, data_spec=data.spec(),
                   n_candidates=len(candidates), n_vocab_words=candidates.n_source,
                   dtype=str(backend.dtype).removeprefix("torch."), device=str(backend.device),
                   **{"control": backend.control, **fields})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop("prompts"))
        if self.control == "none":
            del out["control"]  # absent for the real LM
        return {k: v for k, v in out.items() if v is not None or k in ("template_file", "seed", "method")}


@dataclass
class Run:
    """A finished (or interrupted) run: its folder, its results and how long it took."""

    folder: RunFolder
    results: dict
    seconds: float


# -- shared checks --------------------------------------------------------------------------------


def relation_ids(data: FactData, relation: list[str] | None, all_: bool | None) -> list[str]:
    """The relations asked for: --all, or --relation ids (repeatable, or a comma list), each checked; facts files
    default to all of theirs."""
    if all_ and relation:
        raise ProbeError("give either --relation or --all, not both")
    if all_ or (not relation and data.kind == "files"):  # facts files: every relation in them by default
        return list(data.relations)
    ids = [r.strip() for given in relation or [] for r in given.split(",") if r.strip()]
    if not ids:
        raise ProbeError("no relation given: pass --relation P19 (repeatable, or P19,P20) or --all")
    return [data.relation(rid).id for rid in dict.fromkeys(ids)]


def relation_templates(spec: str | None) -> tuple[dict[str, str], str | None]:
    """Manual templates from --template (eval) or --manual-template (train): a template file keyed by relation
    (its `default` for the others), or one inline `[X] ... [Y]` template for every relation."""
    if spec is None:
        return {}, None
    entries = dict(read_template_spec(spec).entries)
    for key, t in entries.items():
        if t.n_virtual or any(p.kind == WORDS for p in t.parts):
            raise ProbeError(f"template {t.source!r} ({key}) has virtual tokens: a relation's template is real words, "
                             "'[X] ... [Y]' (train a shape with `probe train --template`)")
    default = entries.pop("default", None)
    return {k: t.source for k, t in entries.items()}, default.source if default else None


def load_data(opts: Options, templates: str | None = None, seed: int = 13) -> FactData:
    """The facts asked for (--data, or facts files), with the relation templates given; LAMA's Google-RE files
    get the shipped Google-RE templates."""
    data = open_data(opts.data, opts.facts, opts.train_facts, opts.dev_facts, opts.fields, opts.dev_split, seed)
    by_relation, default = relation_templates(templates)
    if templates is None and data.relations and all(not r.template for r in data.relations.values()):
        shipped = template_sources(GOOGLE_RE_TEMPLATES)
        if set(data.relations) <= set(shipped):
            by_relation = shipped
    return data.with_templates(by_relation, default) if by_relation or default else data


def check_templates(data: FactData, ids: list[str], flag: str) -> None:
    """Every relation asked for has a manual template."""
    missing = [rid for rid in ids if not data.relation(rid).template]
    if missing:
        raise ProbeError(f"relation {missing[0]!r} has no template: give {flag} '[X] ... [Y] .' (one for every relation) "
                         f"or a template file with a '{missing[0]}: [X] ... [Y]' line")


def relation_row(relation: Relation) -> dict:
    """What a relation's metrics.json says of the relation: id, label, type (and whether it was inferred)."""
    return {"relation": relation.id, "label": relation.label, "type": relation.type,
            **({"type_inferred": True} if relation.type_inferred else {})}


def check_new_folder(out: Path | None, resume: bool | None) -> None:
    """An existing run folder is refused without --resume, before anything is loaded."""
    if out is not None and not resume and (Path(out) / "config.json").exists():
        raise ProbeError(f"run folder {out} already exists: pass --resume to continue it, or another --out")


def relation_facts(data: FactData, relation: Relation, split: str, candidates: CandidateVocab, strict: bool):
    """Facts of a split whose object is a candidate; with strict, none left is a ProbeError."""
    facts, dropped = filter_facts(data.facts(relation.id, split), candidates)
    if not facts and strict:
        raise ProbeError(
            f"relation {relation.id} has no {split} facts left after keeping objects that are single tokens "
            f"of the candidate vocabulary ({dropped} dropped)"
        )
    return facts, dropped


def default_out(name: str, model: str) -> Path:
    return Path("runs") / f"{name}-{slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"


def slug(model: str) -> str:
    name = Path(model).name if ("/" in model or model.endswith(".gguf")) else model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.removesuffix(".gguf")) or "model"


def open_model(opts: Options, data: FactData, vocab: str, control: str = "none",
               seed: int | None = None) -> tuple[Backend, CandidateVocab]:
    """The model asked for (a control applied with `seed`) and its single-token candidates of a vocabulary."""
    words = data.vocab_words(vocab)
    backend = load_backend(opts.model or "smollm2", device=opts.device or "cpu", dtype=opts.dtype or "bfloat16",
                           control=control, seed=seed or 0)
    return backend, build_candidates(backend.tokenizer, words)


def _interruptible(run: RunFolder, work) -> dict:
    """Run `work()`; on Ctrl-C the finished relations are summarised and kept, and `Interrupted` names the folder."""
    try:
        return work()
    except KeyboardInterrupt:
        run.write_summary()
        raise Interrupted(run.root) from None


# -- probe eval -----------------------------------------------------------------------------------

DATA_FLAGS = {"data", "facts", "fields"}
EVAL_FLAGS = {"model", "method", "relation", "all", "split", "vocab", "out", "resume", "batch_size", "device",
              "dtype", "control", "seed", "prompts_file", "ensemble", "max_prompts", "template", "from_sentences"} | DATA_FLAGS


def run_eval(opts: Options, log=print) -> Run:
    """`probe eval`: fixed prompts (manual, a prompts file) or the majority control on the relations asked for."""
    t0 = time.time()
    if opts.prompts is not None:
        raise ProbeError("internal: saved prompts go through rerun_prompts")
    opts.refuse(EVAL_FLAGS, "`probe eval`")
    control = opts.control or "none"
    if control not in CONTROLS:
        raise ProbeError(f"unknown control {control!r}: expected one of {', '.join(CONTROLS)}")
    method = opts.method or "manual"
    if method in CONTROLS:
        raise ProbeError(f"{method} is a control, not a method: use --control {method}")
    method_cls = get_method(method)
    if method_cls.can_fit():
        raise ProbeError(f"method {method!r} is trained: use `probe train --method {method}`, then `probe eval --prompts RUN`")
    if control == "majority":
        opts.refuse(EVAL_FLAGS - {"method", "seed", "prompts_file", "ensemble", "max_prompts"}, "--control majority "
                    "(it ranks candidates by their train counts, with no prompt)")
    if opts.seed is not None and control != "random-model":
        raise ProbeError("--seed applies to --control random-model only (a fixed prompt has nothing random)")
    seed = (13 if opts.seed is None else opts.seed) if control == "random-model" else None
    if opts.prompts_file is None and (opts.ensemble or opts.max_prompts is not None):
        raise ProbeError("--ensemble and --max-prompts need --prompts-file")
    max_prompts = opts.max_prompts if opts.max_prompts is not None else (0 if opts.ensemble else 1)
    if max_prompts < 0 or (max_prompts != 1 and not opts.ensemble):
        raise ProbeError(f"--max-prompts {max_prompts}: several prompts per relation need --ensemble (0 means all)")
    batch_size = 128 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    if opts.from_sentences and (opts.prompts_file is not None or opts.template is not None or control == "majority"):
        raise ProbeError("--from-sentences evaluates each fact's cloze sentence: it does not go with --template, "
                         "--prompts-file or --control majority")
    check_new_folder(opts.out, opts.resume)
    data = load_data(opts, opts.template)
    ids = relation_ids(data, opts.relation, opts.all)
    split = data.split_name(opts.split)
    if not opts.from_sentences and opts.prompts_file is None and control != "majority":
        check_templates(data, ids, "--template")
    vocab = opts.vocab or "common"
    data.vocab_words(vocab)  # checks the vocabulary name
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
    if control == "majority":
        method = None
    backend, candidates = open_model(opts, data, vocab, control if control in MODEL_CONTROLS else "none", seed)
    if len(ids) == 1:
        relation_facts(data, data.relation(ids[0]), split, candidates, strict=True)
    log(f"{backend.name} ({backend.kind} LM, {backend.dtype}) loaded in {time.time() - t0:.1f}s; "
        f"{len(candidates):,} of {candidates.n_source:,} {vocab} vocab words are single tokens")
    config = RunConfig.of(
        "eval", backend, data, candidates, method=method, split=split, vocab=vocab, batch_size=batch_size, control=control,
        template_file=str(opts.prompts_file) if opts.prompts_file is not None else None,
        seed=seed,
        method_config={"ensemble": bool(opts.ensemble), "max_prompts": max_prompts} if chosen else None,
        prompts=prompts_info, from_sentences=bool(opts.from_sentences) or None,
    )
    name = f"discrete-{slug(Path(opts.prompts_file).stem)}" if chosen else (method or control)
    name += "-cloze" if opts.from_sentences else ""
    run = RunFolder(opts.out or default_out(name, backend.name), config.to_dict(), resume=bool(opts.resume))
    results = _interruptible(run, lambda: evaluate_relations(backend, data, ids, candidates, run, split, batch_size,
                                                             chosen, majority=control == "majority",
                                                             from_sentences=bool(opts.from_sentences)))
    return Run(run, results, time.time() - t0)


def evaluate_relations(backend: Backend, data: FactData, ids: list[str], candidates: CandidateVocab, run: RunFolder,
                       split: str, batch_size: int = 128, prompts: dict[str, list[DiscretePrompt]] | None = None,
                       majority: bool = False, from_sentences: bool = False) -> dict:
    """Evaluate fixed prompts into a run folder, skipping finished relations; returns the results.

    Each relation gets its manual template, or its prompts (several are an ensemble, see evaluate_ensemble);
    with `majority`, candidates are ranked by their train counts instead, without the LM.
    """
    strict = len(ids) == 1
    todo = []
    for rid in ids:
        relation = data.relation(rid)
        if not run.is_done(rid):
            facts, dropped = relation_facts(data, relation, split, candidates, strict)
            if from_sentences:
                with_sentence = [f for f in facts if f.sentence]
                facts, dropped = with_sentence, dropped + len(facts) - len(with_sentence)
            todo.append((relation, facts, dropped))
    cloze = ClozeTemplate.compile(backend.tokenizer, backend.kind) if from_sentences else None
    n_prompts = {r.id: len(prompts[r.id]) if prompts else 1 for r, _, _ in todo}
    manual = ManualPrompt(0, backend.hidden_size).to(backend.device)
    with tqdm(total=sum(len(f) * n_prompts[r.id] for r, f, _ in todo), unit="fact", desc="eval", dynamic_ncols=True) as bar:
        for relation, facts, dropped in todo:
            bar.set_postfix_str(relation.id)
            base = {**relation_row(relation), "n_dropped": dropped}
            if not facts:
                tqdm.write(f"warning: {relation.id} has no {split} facts left after filtering; skipped", file=sys.stderr)
                continue
            if majority:
                train, _ = relation_facts(data, relation, "train", candidates, False)
                result = evaluate_majority(train, facts, candidates)
                bar.update(len(facts))
                run.save_relation(relation.id, {**base, "n_facts": len(facts), "n_train": len(train), **result.metrics},
                                  result.predictions())
                continue
            if cloze is not None:
                result = evaluate_facts(backend, manual, cloze, facts, candidates, batch_size, bar)
                run.save_relation(relation.id, {**base, "n_facts": len(facts), "template": "cloze sentences",
                                                **result.metrics}, result.predictions())
                continue
            chosen = prompts[relation.id] if prompts else [DiscretePrompt(relation.template, None, "manual")]
            compiled = [compile_template(p.template, backend.tokenizer, backend.kind) for p in chosen]
            weights = [1.0 if p.weight is None else p.weight for p in chosen]
            result = evaluate_ensemble(backend, manual, compiled, weights, facts, candidates, batch_size, bar)
            metrics = {**base, "n_facts": len(facts), "template": chosen[0].template, **result.metrics}
            if len(chosen) > 1:
                metrics.update(templates=[p.template for p in chosen], weights=weights)
            run.save_relation(relation.id, metrics, result.predictions())
    return run.write_summary()


# -- probe train ----------------------------------------------------------------------------------

TRAIN_FLAGS = {"model", "method", "relation", "all", "template", "split", "vocab", "out", "resume", "device",
               "dtype", "control", "init", "reparam", "train_facts", "dev_facts", "dev_split", "manual_template"} | DATA_FLAGS
FIT_FLAGS = {"lr", "epochs", "min_steps", "batch_size", "eval_every", "patience", "max_train", "seed", "iterations",
             "top_k", "capitals"}


def load_template_spec(spec: str | None, method: str | None = None) -> TemplateFile:
    """`--template`: a template file, an inline template, or None for the default shapes.

    The defaults are the P-tuning shapes, unless the method has its own (prefix-tuning puts its prefix first).
    """
    defaults = dict(get_method(method).default_shapes or DEFAULT_SHAPES) if method else dict(DEFAULT_SHAPES)
    tf = read_template_spec(spec) if spec is not None else TemplateFile("<default>", {})
    tf.defaults = defaults
    return tf


def read_template_spec(spec: str) -> TemplateFile:
    """A template option's value: a template file (a path, or a name ending .txt/.tpl), else one inline template
    that applies to every relation (`default`)."""
    if Path(spec).is_file() or spec.endswith((".txt", ".tpl")):
        return parse_template_file(spec)
    return TemplateFile("<inline>", {"default": parse_template(spec)})


def run_train(opts: Options, log=print) -> Run:
    """`probe train`: fit one prompt per relation against the frozen LM, then test it next to the manual prompt."""
    t0 = time.time()
    method = opts.method or "ptuning"
    method_cls = fittable_method(method)
    fit_fields = config_fields(method_cls.fit_config_class)
    opts.refuse(TRAIN_FLAGS | (FIT_FLAGS & fit_fields), f"method {method!r}")
    control = opts.control or "none"
    if control not in MODEL_CONTROLS:
        raise ProbeError(f"--control {control!r} does not apply to `probe train`: expected one of {', '.join(MODEL_CONTROLS)}")
    config_of_method = method_config(method, init=opts.init, reparam=opts.reparam)
    method_cls.check_settings(config_of_method, opts.template is not None)
    fit_config = method_cls.fit_config(**{k: getattr(opts, k) for k in FIT_FLAGS & fit_fields})
    templates = load_template_spec(opts.template, method)
    check_new_folder(opts.out, opts.resume)
    data = load_data(opts, opts.manual_template, fit_config.seed)
    split = data.split_name(opts.split)
    if split not in data.test_splits:
        raise ProbeError(f"--split {split!r}: a trained prompt is tested on {' or '.join(data.test_splits)}, never on "
                         "train or dev")
    ids = relation_ids(data, opts.relation, opts.all)
    check_templates(data, ids, "--manual-template")
    vocab = opts.vocab or "common"
    seed = fit_config.seed
    backend, candidates = open_model(opts, data, vocab, control, seed)
    if len(ids) == 1:
        rel = data.relation(ids[0])
        if not relation_facts(data, rel, "train", candidates, strict=False)[0]:
            raise ProbeError(f"relation {rel.id} has no train facts left after filtering by the candidate vocabulary")
        relation_facts(data, rel, split, candidates, strict=True)
    log(f"{backend.name} ({backend.kind} LM, {backend.dtype}) loaded in {time.time() - t0:.1f}s; {len(candidates):,} candidates")
    config = RunConfig.of(
        "train", backend, data, candidates, method=method, split=split, vocab=vocab, batch_size=128,
        template_file=opts.template, seed=seed, method_config=dataclasses.asdict(config_of_method),
        train=dataclasses.asdict(fit_config),
    )
    run = RunFolder(opts.out or default_out(method, backend.name), config.to_dict(), resume=bool(opts.resume))
    results = _interruptible(run, lambda: train_relations(backend, data, ids, candidates, run, method, config_of_method,
                                                          fit_config, templates, split))
    return Run(run, results, time.time() - t0)


def fittable_method(name: str):
    """The class of a method that can be trained; one that cannot is a ProbeError."""
    method_cls = get_method(name)
    if not method_cls.can_fit():
        raise ProbeError(f"method {name!r} has nothing to train: use `probe eval --method {name}`")
    return method_cls


def compiled_templates(backend: Backend, data: FactData, ids: list[str], method: str, config_of_method,
                       templates: TemplateFile) -> dict:
    """(template, compiled) per relation for a method; every template is checked before any training starts."""
    method_cls = fittable_method(method)
    out = {}
    for rid in ids:
        relation = data.relation(rid)
        template = method_cls.relation_template(templates.template_for(rid, backend.kind), relation.template,
                                                backend.kind, config_of_method)
        compiled = compile_template(template, backend.tokenizer, backend.kind, manual=relation.template)
        if compiled.n_virtual == 0:
            raise ProbeError(f"template {template.source!r} has no virtual tokens: method {method!r} needs some")
        method_cls.check_template(compiled)
        out[rid] = (template, compiled)
    return out


def fit_prompt(backend: Backend, method: str, config_of_method, compiled, manual_template: str, train, dev, candidates,
               fit_config, log_path: Path | None = None, desc: str = "train"):
    """Create a method (seeded by the fit config) and fit it on train with selection on dev: (method, result)."""
    torch.manual_seed(fit_config.seed)
    prompt = get_method(method).create(backend, compiled, manual_template, config_of_method).to(backend.device)
    result = prompt.fit(backend, compiled, train, dev, candidates, fit_config, log_path, desc)
    return prompt, result


def train_relations(backend: Backend, data: FactData, ids: list[str], candidates: CandidateVocab, run: RunFolder,
                    method: str, config_of_method, fit_config, templates: TemplateFile, split: str,
                    batch_size: int = 128) -> dict:
    """Train and test one prompt per relation into a run folder, skipping finished relations."""
    strict = len(ids) == 1
    todo = [data.relation(r) for r in ids if not run.is_done(r)]
    compiled_for = compiled_templates(backend, data, [r.id for r in todo], method, config_of_method, templates)
    manual_prompt = ManualPrompt(0, backend.hidden_size)
    for i, relation in enumerate(todo, 1):
        template, compiled = compiled_for[relation.id]
        train, _ = relation_facts(data, relation, "train", candidates, False)
        if not train:
            msg = f"relation {relation.id} has no train facts left after filtering by the candidate vocabulary"
            if strict:
                raise ProbeError(msg)
            tqdm.write(f"warning: {msg}; skipped", file=sys.stderr)
            continue
        dev, _ = relation_facts(data, relation, "dev", candidates, False)
        dev = dev or train
        test, dropped = relation_facts(data, relation, split, candidates, strict)
        if not test:
            tqdm.write(f"warning: relation {relation.id} has no {split} facts left after filtering; skipped", file=sys.stderr)
            continue
        folder = run.relation_dir(relation.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train_log.jsonl").unlink(missing_ok=True)
        prompt, result = fit_prompt(backend, method, config_of_method, compiled, relation.template, train, dev,
                                    candidates, fit_config, folder / "train_log.jsonl", desc=f"{relation.id} [{i}/{len(todo)}]")
        test_eval = evaluate_facts(backend, prompt, compiled, test, candidates, batch_size)
        manual = compile_template(relation.template, backend.tokenizer, backend.kind)
        manual_dev = evaluate_facts(backend, manual_prompt, manual, dev, candidates, batch_size).metrics
        manual_test = evaluate_facts(backend, manual_prompt, manual, test, candidates, batch_size).metrics
        save_prompt(folder / "prompt.safetensors", prompt)
        atomic_write_json(folder / "config.json", {
            **{k: run.config[k] for k in ("probe_version", "model", "model_kind", "data", "vocab", "split")},
            "relation": relation.id,
            "method": method,
            "method_config": dataclasses.asdict(prompt.config),
            "template": template.source,
            "manual_template": relation.template,
            "n_virtual": compiled.n_virtual,
            "hidden_size": backend.hidden_size,
            "train": dataclasses.asdict(fit_config),
            "n_train": len(train),
            "n_dev": len(dev),
            "best_step": result.best_step,
            "steps": result.steps,
            **({"attempts": result.attempts} if result.attempts else {}),
            **prompt.saved_info(compiled),
        })
        metrics = {
            **relation_row(relation),
            "n_facts": len(test), "n_dropped": dropped, "template": template.source,
            **test_eval.metrics,
            **{f"dev_{k}": v for k, v in result.best_dev.items()},
            **{f"manual_{k}": v for k, v in manual_test.items()},
            **{f"manual_dev_{k}": v for k, v in manual_dev.items()},
            "fit_failed": result.failed,  # dev never rose above the untrained prompt's: not a trained prompt
        }
        run.save_relation(relation.id, metrics, test_eval.predictions())
        if result.failed:
            tqdm.write(f"warning: {relation.id}: dev P@1 never rose above its start in {len(result.attempts) or 1} "
                       "attempt(s); flagged as fit_failed, not a trained prompt", file=sys.stderr)
        tqdm.write(
            f"{relation.id:>6} {relation.label[:28]:28} dev P@1 {result.best_dev['p1']:5.1f} "
            f"(manual {manual_dev['p1']:5.1f})  test P@1 {test_eval.metrics['p1']:5.1f} "
            f"(manual {manual_test['p1']:5.1f})  P@10 {test_eval.metrics['p10']:5.1f}  MRR {test_eval.metrics['mrr']:.3f}"
        )
    return run.write_summary()


# -- saved prompts --------------------------------------------------------------------------------

RERUN_FLAGS = {"prompts", "relation", "all", "data", "batch_size", "device", "model"}  # --data: where the data moved


def save_prompt(path: Path, method) -> None:
    """What evaluation uses (virtual embeddings, or per-layer prefix keys and values), in one safetensors file.

    The method's own weights are added unless it folds them away (prefix-tuning keeps only the MLP's output).
    """
    from safetensors.torch import save

    def plain(t):
        return t.detach().float().cpu().clone().contiguous()

    with torch.no_grad():
        tensors = {}
        embeddings, kv = method.virtual_embeddings(), method.prefix()
        if embeddings is not None:
            tensors["virtual_embeddings"] = plain(embeddings)
        if kv is not None:
            tensors["prefix_keys"], tensors["prefix_values"] = plain(kv[0]), plain(kv[1])
    if method.save_state:
        tensors.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in method.state_dict().items()})
    atomic_write_bytes(path, save(tensors))


def load_prompt(path) -> FixedPrompt:
    """A FixedPrompt from a saved prompt file; a damaged file is a ProbeError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ProbeError(f"{path}: not a readable prompt file ({e})") from None
    embeddings, keys, values = (tensors.get(k) for k in ("virtual_embeddings", "prefix_keys", "prefix_values"))
    if embeddings is None and keys is None:
        raise ProbeError(f"{path}: not a prompt file (expected 'virtual_embeddings' or 'prefix_keys')")
    if embeddings is not None and (embeddings.ndim != 2 or not embeddings.is_floating_point()):
        raise ProbeError(f"{path}: expected a 2-D float tensor 'virtual_embeddings', got shape {tuple(embeddings.shape)}")
    if keys is not None and (values is None or keys.ndim != 3 or values.ndim != 3 or keys.shape[:2] != values.shape[:2]):
        raise ProbeError(f"{path}: expected 'prefix_keys' and 'prefix_values' of shape (layers, n_virtual, dim)")
    return FixedPrompt(embeddings, keys, values)


def saved_relations(run_dir: Path) -> list[str]:
    """The relations of a training run folder with a finished, saved prompt, in the folder's order."""
    found = [p.parent.name for p in Path(run_dir).glob("*/metrics.json") if (p.parent / "prompt.safetensors").is_file()]
    return sorted(found, key=relation_key)


def rerun_prompts(opts: Options) -> list[dict]:
    """`probe eval --prompts RUN`: re-evaluate a training run's saved prompts on its own split, vocabulary, model
    and dtype; rows carry the saved and the recomputed metrics."""
    opts.refuse(RERUN_FLAGS, "`probe eval --prompts` (it re-evaluates the run's own split, vocabulary, model and dtype)")
    batch_size = 128 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    run_dir = Path(opts.prompts)
    if not run_dir.exists():
        raise ProbeError(f"run folder {run_dir} does not exist")
    cfg = read_json(run_dir / "config.json")
    if cfg.get("command") != "train":
        raise ProbeError(f"{run_dir} is not a training run folder (its config.json says command {cfg.get('command')!r})")
    if opts.model is not None and opts.model != cfg["model"]:
        raise ProbeError(f"run folder {run_dir} was trained on model {cfg['model']!r}, not {opts.model!r}")
    data = reopen_data(cfg, opts.data)
    saved = saved_relations(run_dir)
    if not saved:
        raise ProbeError(f"{run_dir} holds no saved prompts (expected RELATION/prompt.safetensors)")
    ids = saved
    if opts.relation or opts.all:
        asked = relation_ids(data, opts.relation, opts.all)
        missing = [r for r in asked if r not in saved] if opts.relation else []
        if missing:
            raise ProbeError(f"{run_dir} has no saved prompt for {', '.join(missing)} (it has {', '.join(saved)})")
        ids = [r for r in saved if r in asked]
    backend = load_backend(cfg["model"], device=opts.device or "cpu", dtype=cfg.get("dtype", "float32"),
                           control=cfg.get("control", "none"), seed=cfg.get("seed") or 0)
    if backend.kind != cfg["model_kind"]:
        raise ProbeError(f"run folder {run_dir} was trained on a {cfg['model_kind']} LM, {cfg['model']!r} is {backend.kind}")
    candidates = build_candidates(backend.tokenizer, data.vocab_words(cfg["vocab"]))
    return reevaluate_run(backend, data, run_dir, candidates, batch_size, ids)


def reopen_data(cfg: dict, data: str | None = None) -> FactData:
    """The data a run was made on: `data` if given (the folder moved), else as its config records it."""
    if data is not None:
        return open_data(data)
    spec = cfg.get("data_spec") or {"data": cfg["data"]}
    return open_data(spec.get("data"), spec.get("facts"), fields=spec.get("fields"), dev_split=spec.get("dev_split"),
                     seed=spec.get("seed", 13))


def reevaluate_run(backend: Backend, data: FactData, run_dir: Path, candidates: CandidateVocab, batch_size: int = 128,
                   ids: list[str] | None = None) -> list[dict]:
    """Re-evaluate the saved prompts of a run folder (all, or `ids`); rows carry the saved and recomputed metrics."""
    rows = []
    for rid in tqdm(ids or saved_relations(run_dir), desc="eval", unit="relation", dynamic_ncols=True):
        folder = Path(run_dir) / rid
        rel_cfg = read_json(folder / "config.json")
        metrics = read_json(folder / "metrics.json")
        relation = data.relation(rel_cfg["relation"])
        manual = rel_cfg.get("manual_template") or relation.template
        compiled = compile_template(rel_cfg["template"], backend.tokenizer, backend.kind, manual=manual)
        prompt = load_prompt(folder / "prompt.safetensors").to(backend.device)
        if prompt.n_virtual != compiled.n_virtual:
            raise ProbeError(f"{folder}: {prompt.n_virtual} saved vectors for {compiled.n_virtual} virtual slots")
        facts, _ = relation_facts(data, relation, rel_cfg["split"], candidates, True)
        result = evaluate_facts(backend, prompt, compiled, facts, candidates, batch_size)
        rows.append({**metrics, **{f"saved_{k}": metrics[k] for k in ("p1", "p10", "mrr")}, **result.metrics,
                     "n_facts": len(facts)})
    if not rows:
        raise ProbeError(f"{run_dir} holds no saved prompts (expected RELATION/prompt.safetensors)")
    return rows
