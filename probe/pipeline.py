"""Runs: the user's settings checked once, one run config built, every relation evaluated or trained into a run folder.

`run_eval`, `run_train` and `rerun_prompts` are what `probe eval` and `probe train` call. Every setting is checked
before any folder is created or any model is loaded, and a flag that does not apply to the command is an error.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from probe import __version__
from probe.backends import Backend, ModelInfo, load_backend, model_info
from probe.batching import relation_facts
from probe.cells import Cell, CellOutput, InProcess, ModelSpec, Worker
from probe.controls import CONTROLS, MODEL_CONTROLS
from probe.data import FactData, Relation, open_data, relation_key
from probe.errors import Interrupted, ProbeError, check_positive
from probe.evaluate import evaluate_ensemble, evaluate_facts, evaluate_majority
from probe.methods import FixedPrompt, get_method, method_config
from probe.methods.manual import ManualPrompt
from probe.objects import MASKED_SCORING, ObjectsSpec, read_candidates_file
from probe.prompt_files import DiscretePrompt, read_prompts
from probe.runs import RunFolder, atomic_write_bytes, read_json, slug
from probe.templates import (
    DEFAULT_SHAPES,
    GOOGLE_RE_TEMPLATES,
    WORDS,
    ClozeTemplate,
    Template,
    TemplateFile,
    compile_template,
    parse_template,
    parse_template_file,
    template_sources,
)
from probe.train import config_fields
from probe.vocab import CandidateChoice, CandidateVocab


@dataclass
class Options:
    """The flags of `probe eval` and `probe train` as the user gave them; None: not given."""

    model: list[str] | None = None  # several for `probe eval` (one run folder each)
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
    ray: str | None = None  # 'local', 'auto' or a cluster address
    save_model: bool | None = None
    cpus_per_worker: int | None = None
    objects: str | None = None  # 'single' (LAMA's protocol) or 'any'
    candidates: Path | None = None  # --objects any: a candidates file
    length_norm: bool | None = None

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
    objects: dict | None = None  # --objects any: the candidates, their count per relation, the scoring
    from_sentences: bool | None = None  # cloze sentences instead of templates (causal LMs: the text before [MASK])
    probe_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    @classmethod
    def of(cls, command: str, backend: Backend, data: FactData, candidates: CandidateVocab | None = None,
           **fields) -> RunConfig:
        """A run config with the model, data and candidates (or the counts given) filled in from the objects themselves."""
        counts = {"n_candidates": len(candidates), "n_vocab_words": candidates.n_source} if candidates is not None else {}
        return cls(command=command, model=backend.name, model_kind=backend.kind, data=data.name, data_spec=data.spec(),
                   **counts,
                   dtype=str(backend.dtype).removeprefix("torch."), device=str(backend.device),
                   **{"control": backend.control, **fields})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop("prompts"))
        out.update(out.pop("objects") or {})
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


def default_out(name: str, model: str) -> Path:
    return Path("runs") / f"{name}-{slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"


def model_names(opts: Options, several: bool) -> list[str]:
    """--model, given once or (where `several`) more than once; default smollm2."""
    names = list(dict.fromkeys(opts.model or ["smollm2"]))
    if len(names) > 1 and not several:
        raise ProbeError("--model is given more than once: several models go in `probe eval` or a sweep grid's model axis")
    return names


def make_executor(opts: Options, data: FactData, candidates: CandidateChoice, log=print) -> InProcess:
    """Where the cells run: this process, or Ray with --ray (a local Ray, 'auto', or a cluster address)."""
    if opts.ray is None:
        if opts.cpus_per_worker is not None:
            raise ProbeError("--cpus-per-worker applies to --ray only")
        return InProcess(data, candidates, log=log)
    from probe.ray_cells import RayExecutor

    return RayExecutor(data, candidates, opts.ray, opts.cpus_per_worker or 1, log=log)


def candidate_choice(opts: Options) -> CandidateChoice:
    """--objects single (LAMA's single-token candidates of --vocab) or any (each relation's objects of any length,
    or those of --candidates), checked before any model loads."""
    objects = opts.objects or "single"
    if objects not in ("single", "any"):
        raise ProbeError(f"--objects {objects!r}: expected single (LAMA's one-token objects) or any")
    if objects == "single":
        if opts.candidates is not None or opts.length_norm:
            raise ProbeError("--candidates and --length-norm apply to --objects any")
        return CandidateChoice(opts.vocab or "common")
    if opts.vocab is not None:
        raise ProbeError("--vocab applies to --objects single: with --objects any the candidates are each relation's "
                         "objects, or --candidates FILE")
    if opts.candidates is not None:
        read_candidates_file(opts.candidates)  # an empty or unreadable file fails here, before any model loads
    spec = ObjectsSpec(str(Path(opts.candidates).resolve()) if opts.candidates is not None else None, bool(opts.length_norm))
    return CandidateChoice("objects", spec)


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


def open_model(name: str, opts: Options, executor, control: str = "none", seed: int | None = None) -> tuple[ModelSpec, ModelInfo]:
    """The spec workers load a model by (a control applied with `seed`) and, for the driver, its kind and tokenizer."""
    device = opts.device or executor.device
    executor.check_device(device)
    spec = ModelSpec(name, device, opts.dtype or "bfloat16", control, (seed or 0) if control != "none" else 0)
    info = model_info(name, device, spec.dtype, control, check_device=isinstance(executor, InProcess))
    return spec, info


def check_model_slugs(names: list[str], where: str) -> None:
    """Several models get a folder (or a cell key) each, named by `slug`: two that would share one are refused."""
    seen: dict[str, str] = {}
    for name in names:
        if slug(name) in seen:
            raise ProbeError(f"models {seen[slug(name)]!r} and {name!r} {where} would share the folder name "
                             f"{slug(name)!r}: copy or link one under another name")
        seen[slug(name)] = name


def run_folder_for(out: Path | None, name: str, model: str, several: bool, config: dict, resume: bool) -> RunFolder:
    """A model's run folder: --out, else runs/<name>-<model>-<time>; with several models, `out` is their parent
    and each has <out>/<model>."""
    if out is None:
        return RunFolder(default_out(name, model), config, resume=resume)
    return RunFolder(Path(out) / slug(model) if several else out, config, resume=resume)


def execute(executor, runs: list[RunFolder], cells: list, desc: str, log=print) -> list[dict]:
    """Run cells, keeping each run's tables current; Ctrl-C keeps what finished and names the folder to resume."""
    try:
        progress = executor.run(cells, desc=desc)
    except KeyboardInterrupt:
        for run in runs:
            run.write_summary()
        raise Interrupted(runs[0].root if len(runs) == 1 else runs[0].root.parent) from None
    finally:
        executor.close()
    results = [run.write_summary() for run in runs]
    progress.report(log)
    return results


def candidate_counts(candidates, dropped: int) -> dict:
    """What a relation's metrics say of its candidates: how many, and why facts were dropped, if any were."""
    return {"n_candidates": len(candidates), **({"dropped_reason": candidates.dropped_reason} if dropped else {})}


def relation_output(rid: str, metrics: dict, predictions: list[dict] | None = None,
                    files: tuple[tuple[str, bytes], ...] = ()) -> CellOutput:
    """A relation's files: any extra ones, then predictions.jsonl, then metrics.json, which marks it finished."""
    out = [(f"{rid}/{name}", blob) for name, blob in files]
    if predictions is not None:
        out.append((f"{rid}/predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions).encode()))
    out.append((f"{rid}/metrics.json", (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode()))
    return CellOutput(out)


# -- probe eval -----------------------------------------------------------------------------------

DATA_FLAGS = {"data", "facts", "fields"}
RAY_FLAGS = {"ray", "cpus_per_worker"}
OBJECT_FLAGS = {"objects", "candidates", "length_norm"}
EVAL_FLAGS = {"model", "method", "relation", "all", "split", "vocab", "out", "resume", "batch_size", "device",
              "dtype", "control", "seed", "prompts_file", "ensemble", "max_prompts", "template",
              "from_sentences"} | DATA_FLAGS | RAY_FLAGS | OBJECT_FLAGS


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
    """One relation evaluated with fixed prompts (its manual template, a prompts file, cloze sentences) or majority."""

    split: str
    batch_size: int = 128
    strict: bool = False
    prompts: list[DiscretePrompt] | None = None
    majority: bool = False
    from_sentences: bool = False

    def run(self, worker: Worker) -> CellOutput:
        backend, data = worker.backend, worker.data
        relation = data.relation(self.key)
        candidates = worker.candidates.for_relation(relation.id)
        facts, dropped = worker.facts(relation, self.split, self.strict)
        if self.from_sentences:
            with_sentence = [f for f in facts if f.sentence]
            facts, dropped = with_sentence, dropped + len(facts) - len(with_sentence)
        if not facts:
            return CellOutput(warning=f"{relation.id} has no {self.split} facts left after filtering; skipped")
        base = {**relation_row(relation), "n_dropped": dropped, "n_facts": len(facts), **candidate_counts(candidates, dropped)}
        if self.majority:
            train, _ = worker.facts(relation, "train")
            result = evaluate_majority(train, facts, candidates)
            return relation_output(relation.id, {**base, "n_train": len(train), **result.metrics}, result.predictions())
        manual = ManualPrompt(0, backend.hidden_size).to(backend.device)
        n_prompts = len(self.prompts) if self.prompts else 1
        with tqdm(total=len(facts) * n_prompts, unit="fact", desc=relation.id, dynamic_ncols=True, leave=False) as bar:
            if self.from_sentences:
                cloze = ClozeTemplate.compile(backend.tokenizer, backend.kind)
                result = evaluate_facts(backend, manual, cloze, facts, candidates, self.batch_size, bar)
                return relation_output(relation.id, {**base, "template": "cloze sentences", **result.metrics},
                                       result.predictions())
            chosen = self.prompts or [DiscretePrompt(relation.template, None, "manual")]
            compiled = [compile_template(p.template, backend.tokenizer, backend.kind) for p in chosen]
            weights = [1.0 if p.weight is None else p.weight for p in chosen]
            result = evaluate_ensemble(backend, manual, compiled, weights, facts, candidates, self.batch_size, bar)
        metrics = {**base, "template": chosen[0].template, **result.metrics}
        if len(chosen) > 1:
            metrics.update(templates=[p.template for p in chosen], weights=weights)
        return relation_output(relation.id, metrics, result.predictions())


def run_eval(opts: Options, log=print) -> list[Run]:
    """`probe eval`: fixed prompts (manual, a prompts file) or the majority control on the relations asked for,
    for one model or several (one run folder each)."""
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
    names = model_names(opts, several=True)
    several = len(names) > 1
    out = opts.out
    if several:  # one parent folder, a run folder per model in it
        check_model_slugs(names, "given with --model")
        out = out or default_out(opts.method or opts.control or "manual", "models")
        for name in names:
            check_new_folder(Path(out) / slug(name), opts.resume)
    else:
        check_new_folder(out, opts.resume)
    data = load_data(opts, opts.template)
    ids = relation_ids(data, opts.relation, opts.all)
    split = data.split_name(opts.split)
    if not opts.from_sentences and opts.prompts_file is None and control != "majority":
        check_templates(data, ids, "--template")
    choice = candidate_choice(opts)
    vocab = choice.vocab
    if choice.objects is None:
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
    executor = make_executor(opts, data, choice, log)
    name = f"discrete-{slug(Path(opts.prompts_file).stem)}" if chosen else (method or control)
    name += "-cloze" if opts.from_sentences else ""
    name += "-any" if choice.objects else ""
    runs, cells = [], []
    for model in names:
        spec, info = open_model(model, opts, executor, control if control in MODEL_CONTROLS else "none", seed)
        candidates = choice.build(info.tokenizer, data)
        objects, n_candidates, n_source = describe_candidates(choice, candidates, info.kind, ids)
        if len(ids) == 1:
            relation_facts(data, data.relation(ids[0]), split, candidates, strict=True)
        log(candidates_line(info, spec.dtype, choice, objects, n_candidates, n_source))
        config = RunConfig.of(
            "eval", info, data, n_candidates=n_candidates, n_vocab_words=n_source, objects=objects or None,
            method=method, split=split, vocab=vocab, batch_size=batch_size, control=control,
            template_file=str(opts.prompts_file) if opts.prompts_file is not None else None,
            seed=seed,
            method_config={"ensemble": bool(opts.ensemble), "max_prompts": max_prompts} if chosen else None,
            prompts=prompts_info, from_sentences=bool(opts.from_sentences) or None,
        )
        run = run_folder_for(out, name, info.name, several, config.to_dict(), bool(opts.resume))
        runs.append(run)
        cells += eval_cells(spec, run, ids, split, batch_size, chosen, control == "majority", bool(opts.from_sentences))
    results = execute(executor, runs, cells, "eval", log)
    return [Run(run, res, time.time() - t0) for run, res in zip(runs, results, strict=True)]


def eval_cells(spec: ModelSpec, run: RunFolder, ids: list[str], split: str, batch_size: int = 128,
               prompts: dict[str, list[DiscretePrompt]] | None = None, majority: bool = False,
               from_sentences: bool = False) -> list[EvalCell]:
    """One cell per relation of a run folder."""
    return [EvalCell(rid, spec, run.root, split, batch_size, len(ids) == 1, prompts[rid] if prompts else None, majority,
                     from_sentences) for rid in ids]


def evaluate_relations(backend: Backend, data: FactData, ids: list[str], candidates: CandidateVocab, run: RunFolder,
                       split: str, batch_size: int = 128, prompts: dict[str, list[DiscretePrompt]] | None = None,
                       majority: bool = False, from_sentences: bool = False) -> dict:
    """Evaluate fixed prompts on a model already loaded into a run folder, skipping finished relations; returns the
    results.

    Each relation gets its manual template, or its prompts (several are an ensemble, see evaluate_ensemble);
    with `majority`, candidates are ranked by their train counts instead, without the LM.
    """
    worker = Worker(backend, data, candidates)
    cells = eval_cells(worker.spec, run, ids, split, batch_size, prompts, majority, from_sentences)
    InProcess(data, worker=worker).run(cells, desc="eval")
    return run.write_summary()


# -- probe train ----------------------------------------------------------------------------------

TRAIN_FLAGS = {"model", "method", "relation", "all", "template", "split", "vocab", "out", "resume", "device",
               "dtype", "control", "init", "reparam", "train_facts", "dev_facts", "dev_split",
               "manual_template", "save_model"} | DATA_FLAGS | RAY_FLAGS | OBJECT_FLAGS
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


def run_train(opts: Options, log=print) -> list[Run]:
    """`probe train`: fit one prompt per relation against the frozen LM, then test it next to the manual prompt."""
    t0 = time.time()
    method = opts.method or "ptuning"
    method_cls = fittable_method(method)
    fit_fields = config_fields(method_cls.fit_config_class)
    opts.refuse(TRAIN_FLAGS | (FIT_FLAGS & fit_fields), f"method {method!r}")
    control = opts.control or "none"
    if control not in MODEL_CONTROLS:
        raise ProbeError(f"--control {control!r} does not apply to `probe train`: expected one of {', '.join(MODEL_CONTROLS)}")
    (name,) = model_names(opts, several=False)
    config_of_method = method_config(method, init=opts.init, reparam=opts.reparam)
    method_cls.check_settings(config_of_method, opts.template is not None)
    if opts.save_model and not method_cls.trains_lm:
        raise ProbeError(f"--save-model applies to methods that train the LM's weights; {method!r} trains a prompt, "
                         "which every run saves")
    if method_cls.trains_lm:  # AdamW on the weights themselves: float32 master weights
        if opts.dtype not in (None, "float32"):
            raise ProbeError(f"method {method!r} trains the LM's weights in float32: --dtype {opts.dtype} does not apply")
        opts = dataclasses.replace(opts, dtype="float32")
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
    choice = candidate_choice(opts)
    vocab = choice.vocab
    seed = fit_config.seed
    executor = make_executor(opts, data, choice, log)
    spec, info = open_model(name, opts, executor, control, seed)
    candidates = choice.build(info.tokenizer, data)
    objects, n_candidates, n_source = describe_candidates(choice, candidates, info.kind, ids)
    if len(ids) == 1:
        rel = data.relation(ids[0])
        if not relation_facts(data, rel, "train", candidates, strict=False)[0]:
            raise ProbeError(f"relation {rel.id} has no train facts left after filtering by the candidate vocabulary")
        relation_facts(data, rel, split, candidates, strict=True)
    log(candidates_line(info, spec.dtype, choice, objects, n_candidates, n_source))
    config = RunConfig.of(
        "train", info, data, n_candidates=n_candidates, n_vocab_words=n_source, objects=objects or None,
        method=method, split=split, vocab=vocab, batch_size=128,
        template_file=opts.template, seed=seed, method_config=dataclasses.asdict(config_of_method),
        train=dataclasses.asdict(fit_config),
    )
    run = RunFolder(opts.out or default_out(method + ("-any" if choice.objects else ""), info.name), config.to_dict(),
                    resume=bool(opts.resume))
    cells = train_cells(spec, info, data, ids, run, method, config_of_method, fit_config, templates, split,
                        bool(opts.save_model))
    (results,) = execute(executor, [run], cells, "train", log)
    return [Run(run, results, time.time() - t0)]


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
        method_cls.check_template(compiled)
        out[rid] = (template, compiled)
    return out


def fit_prompt(backend: Backend, method: str, config_of_method, compiled, manual_template: str, train, dev, candidates,
               fit_config, log_path: Path | None = None, desc: str = "train"):
    """Create a method (seeded by the fit config) and fit it on train with selection on dev: (method, result)."""
    torch.manual_seed(fit_config.seed)
    prompt = get_method(method).create(backend, compiled, manual_template, config_of_method).to(backend.device)
    try:
        result = prompt.fit(backend, compiled, train, dev, candidates, fit_config, log_path, desc)
    except BaseException:
        prompt.release()  # a method that trained the LM puts it back
        raise
    return prompt, result


@dataclass
class TrainCell(RelationCell):
    """One relation's prompt: fit on train with selection on dev, then tested next to the manual prompt."""

    method: str
    config_of_method: object
    fit_config: object
    template: Template
    split: str
    run_info: dict  # what the relation's config.json repeats of the run's
    strict: bool = False
    position: str = ""  # "[3/41]" in the progress bar
    batch_size: int = 128
    save_model: bool = False  # methods that train the LM: its weights in model.safetensors

    def run(self, worker: Worker) -> CellOutput:
        backend, data = worker.backend, worker.data
        relation = data.relation(self.key)
        candidates = worker.candidates.for_relation(relation.id)
        compiled = compile_template(self.template, backend.tokenizer, backend.kind, manual=relation.template)
        train, _ = worker.facts(relation, "train")
        if not train:
            msg = f"relation {relation.id} has no train facts left after filtering by the candidate vocabulary"
            if self.strict:
                raise ProbeError(msg)
            return CellOutput(warning=f"{msg}; skipped")
        dev, _ = worker.facts(relation, "dev")
        dev = dev or train
        test, dropped = worker.facts(relation, self.split, self.strict)
        if not test:
            return CellOutput(warning=f"relation {relation.id} has no {self.split} facts left after filtering; skipped")
        with tempfile.TemporaryDirectory(prefix="probe-train-") as scratch:
            # the log streams into the run folder in process (to follow it), into scratch on a Ray worker
            log_path = Path(scratch if worker.remote else Path(self.root) / relation.id) / "train_log.jsonl"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.unlink(missing_ok=True)
            prompt, result = fit_prompt(backend, self.method, self.config_of_method, compiled, relation.template, train,
                                        dev, candidates, self.fit_config, log_path, desc=f"{relation.id} {self.position}")
            try:
                files = [("train_log.jsonl", log_path.read_bytes())]
                test_eval = evaluate_facts(backend, prompt, compiled, test, candidates, self.batch_size)
                if not prompt.trains_lm:
                    files.append(("prompt.safetensors", prompt_bytes(prompt)))
                elif self.save_model:
                    files.append(("model.safetensors", safetensors_bytes(prompt.lm_state())))
            finally:
                prompt.release()  # the next relation starts from the LM as it was
        manual = compile_template(relation.template, backend.tokenizer, backend.kind)
        manual_prompt = ManualPrompt(0, backend.hidden_size)
        manual_dev = evaluate_facts(backend, manual_prompt, manual, dev, candidates, self.batch_size).metrics
        manual_test = evaluate_facts(backend, manual_prompt, manual, test, candidates, self.batch_size).metrics
        config = {
            **self.run_info,
            "relation": relation.id,
            "method": self.method,
            "method_config": dataclasses.asdict(prompt.config),
            "template": self.template.source,
            "manual_template": relation.template,
            "n_virtual": compiled.n_virtual,
            "hidden_size": backend.hidden_size,
            "train": dataclasses.asdict(self.fit_config),
            "n_train": len(train),
            "n_dev": len(dev),
            "best_step": result.best_step,
            "steps": result.steps,
            "torch_threads": torch.get_num_threads(),  # CPU sums, so a fit's path, depend on it (in process or on Ray)
            **({"attempts": result.attempts} if result.attempts else {}),
            **prompt.saved_info(compiled),
        }
        metrics = {
            **relation_row(relation),
            "n_facts": len(test), "n_dropped": dropped, **candidate_counts(candidates, dropped),
            "template": self.template.source,
            **test_eval.metrics,
            **{f"dev_{k}": v for k, v in result.best_dev.items()},
            **{f"manual_{k}": v for k, v in manual_test.items()},
            **{f"manual_dev_{k}": v for k, v in manual_dev.items()},
            "fit_failed": result.failed,  # dev never rose above the untrained prompt's: not a trained prompt
        }
        files.append(("config.json", (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()))
        output = relation_output(relation.id, metrics, test_eval.predictions(), tuple(files))
        if result.failed:
            output.warning = (f"{relation.id}: dev P@1 never rose above its start in {len(result.attempts) or 1} "
                              "attempt(s); flagged as fit_failed, not a trained prompt")
        output.message = (
            f"{relation.id:>6} {relation.label[:28]:28} dev P@1 {result.best_dev['p1']:5.1f} "
            f"(manual {manual_dev['p1']:5.1f})  test P@1 {test_eval.metrics['p1']:5.1f} "
            f"(manual {manual_test['p1']:5.1f})  P@10 {test_eval.metrics['p10']:5.1f}  MRR {test_eval.metrics['mrr']:.3f}"
        )
        return output


def train_cells(spec: ModelSpec, model, data: FactData, ids: list[str], run: RunFolder, method: str, config_of_method,
                fit_config, templates: TemplateFile, split: str, save_model: bool = False) -> list[TrainCell]:
    """One cell per unfinished relation of a run folder; every template is checked (on `model`'s tokenizer) first."""
    todo = [r for r in ids if not run.is_done(r)]
    templates_of = compiled_templates(model, data, todo, method, config_of_method, templates)
    run_info = {k: run.config[k] for k in ("probe_version", "model", "model_kind", "data", "vocab", "split")}
    return [TrainCell(rid, spec, run.root, method, config_of_method, fit_config, templates_of[rid][0], split, run_info,
                      len(ids) == 1, f"[{i}/{len(todo)}]", save_model=save_model) for i, rid in enumerate(todo, 1)]


def train_relations(backend: Backend, data: FactData, ids: list[str], candidates: CandidateVocab, run: RunFolder,
                    method: str, config_of_method, fit_config, templates: TemplateFile, split: str) -> dict:
    """Train and test one prompt per relation on a model already loaded, into a run folder, skipping finished
    relations; returns the results."""
    worker = Worker(backend, data, candidates)
    cells = train_cells(worker.spec, backend, data, ids, run, method, config_of_method, fit_config, templates, split)
    InProcess(data, worker=worker).run(cells, desc="train")
    return run.write_summary()


# -- saved prompts --------------------------------------------------------------------------------

RERUN_FLAGS = {"prompts", "relation", "all", "data", "batch_size", "device", "model"}  # --data: where the data moved


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def prompt_bytes(method) -> bytes:
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
    return save(tensors)


def save_prompt(path: Path, method) -> None:
    """A prompt file written atomically (see prompt_bytes)."""
    atomic_write_bytes(path, prompt_bytes(method))


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
    if opts.model and model_names(opts, several=False) != [cfg["model"]]:
        raise ProbeError(f"run folder {run_dir} was trained on model {cfg['model']!r}, not {opts.model[0]!r}")
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
    candidates = run_candidates(cfg).build(backend.tokenizer, data)
    return reevaluate_run(backend, data, run_dir, candidates, batch_size, ids)


def run_candidates(cfg: dict) -> CandidateChoice:
    """The candidates a run's config records: single tokens of its vocabulary, or objects of any length."""
    if cfg.get("objects") != "any":
        return CandidateChoice(cfg["vocab"])
    source = cfg.get("candidates")
    return CandidateChoice("objects", ObjectsSpec(None if source == "relation objects" else source,
                                                  bool(cfg.get("length_norm"))))


def reopen_data(cfg: dict, data: str | None = None) -> FactData:
    """The data a run was made on: `data` if given (the folder moved), else as its config records it."""
    if data is not None:
        return open_data(data)
    spec = cfg.get("data_spec") or {"data": cfg["data"]}
    return open_data(spec.get("data"), spec.get("facts"), fields=spec.get("fields"), dev_split=spec.get("dev_split"),
                     seed=spec.get("seed", 13))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `n` inside the block (None: left as it is), then put back."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reevaluate_run(backend: Backend, data: FactData, run_dir: Path, candidates, batch_size: int = 128,
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
        # as many CPU threads as the fit had: bfloat16 sums, so a few ranks, depend on it
        with torch_threads(rel_cfg.get("torch_threads") if backend.device.type == "cpu" else None):
            result = evaluate_facts(backend, prompt, compiled, facts, candidates.for_relation(relation.id), batch_size)
        rows.append({**metrics, **{f"saved_{k}": metrics[k] for k in ("p1", "p10", "mrr")}, **result.metrics,
                     "n_facts": len(facts)})
    if not rows:
        raise ProbeError(f"{run_dir} holds no saved prompts (expected RELATION/prompt.safetensors)")
    return rows
