"""The flags of `probe eval`, `probe train` and `probe sweep` as the user gave them, and the checks that need no
model: which flags apply, relations, models, candidates, templates, data, output folders, threads, the executor.

Every check here runs before any folder is made or any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from probe.cells import Executor, InProcess
from probe.data import FactData, open_data
from probe.errors import DataError, ModelError, RunFolderError, SettingError, TemplateError, check_positive
from probe.methods import get_method
from probe.objects import ObjectsSpec, read_candidates_file
from probe.ray_cells import RayExecutor
from probe.runs import check_own_folder, slug
from probe.template_files import GOOGLE_RE_TEMPLATES, TemplateFile, read_template_spec, relation_templates, template_sources
from probe.templates import DEFAULT_SHAPES
from probe.vocab import CandidateChoice


@dataclass(init=False)
class Options:
    """The flags of `probe eval` and `probe train` as the user gave them; None: not given. A method's settings (its
    options and fit settings: --lr, --iterations, --init, ...) are not fields: they come in `settings`, by name, and
    any other keyword given to Options is one of them (`Options(lr=0.01)` is `Options(settings={"lr": 0.01})`)."""

    model: list[str] | None = None  # several for `probe eval` (one run folder each)
    method: str | None = None
    relation: list[str] | None = None
    all: bool | None = None
    split: str | None = None
    vocab: str | None = None
    data: str | None = None
    out: Path | None = None
    resume: bool | None = None
    batch_size: int | None = None  # `probe eval`'s facts per batch (in `probe train`, the fit setting)
    device: str | None = None
    dtype: str | None = None
    control: str | None = None
    seed: int | None = None  # `probe eval --control`'s seed (in `probe train`, the fit setting)
    prompts: Path | None = None
    prompts_file: Path | None = None
    ensemble: bool | None = None
    max_prompts: int | None = None
    template: str | None = None
    option: list[str] | None = None  # method options as NAME=VALUE
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
    threads: int | None = None  # torch's CPU threads per process that computes
    jobs: int | None = None  # cells run at once in this process, on threads (None: one after another)
    pack: int | None = None  # prompts trained at once in one pass (None: by the device)
    max_memory: str | None = None  # place the model over several devices: 0:70GiB,1:70GiB,cpu:200GiB
    fallback: str | None = None  # "manual": keep the manual prompt where the trained one is below it on dev
    preset: str | None = None  # a named set of fit settings of the method (autoprompt: paper)
    objects: str | None = None  # 'single' (LAMA's protocol) or 'any'
    candidates: Path | None = None  # --objects any: a candidates file
    length_norm: bool | None = None
    allow_download: bool | None = None  # eval --prompts: load the hub model a run folder names
    allow_overlap: bool | None = None  # train: test facts that are also train or dev facts, without a warning
    report_to: list[str] | None = None  # experiment trackers (probe/tracking.py)
    score: str | None = None  # 'object' or 'statement' (default: statement for a BEAR folder, else object)
    reduction: str | None = None  # --score statement: 'sum' (default) or 'mean'

    settings: dict | None = None  # the method's settings given, by name (see probe.methods.method_settings)

    def __init__(self, settings: dict | None = None, **given):
        for f in dataclasses.fields(self):
            if f.name != "settings":
                setattr(self, f.name, given.pop(f.name, None))
        self.settings = {k: v for k, v in {**(settings or {}), **given}.items() if v is not None}

    def method_settings(self) -> dict:
        """The settings of the method given, by name: `settings`, with --seed and --batch-size (fields, since
        `probe eval` has them too)."""
        shared = {k: getattr(self, k) for k in ("seed", "batch_size") if getattr(self, k) is not None}
        return {**shared, **(self.settings or {})}

    def given(self) -> set[str]:
        flags = {f.name for f in dataclasses.fields(self) if f.name != "settings"
                 and getattr(self, f.name) is not None and getattr(self, f.name) != []}
        return flags | set(self.settings or {})

    def refuse(self, allowed: set[str], where: str) -> None:
        """A given flag outside `allowed` is an error naming it and `where` it was given."""
        extra = sorted(self.given() - allowed)
        if extra:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in extra)
            raise SettingError(f"{flags} {'does' if len(extra) == 1 else 'do'} not apply to {where}")


DATA_FLAGS = {"data", "facts", "fields"}
RAY_FLAGS = {"ray", "cpus_per_worker"}
OBJECT_FLAGS = {"objects", "candidates", "length_norm"}
RUN_FLAGS = {"model", "method", "relation", "all", "split", "vocab", "out", "resume", "device", "dtype", "control",
             "threads", "jobs", "max_memory"} | DATA_FLAGS | RAY_FLAGS | OBJECT_FLAGS


def relation_ids(data: FactData, relation: list[str] | None, all_: bool | None) -> list[str]:
    """The relations asked for: --all, or --relation ids (repeatable, or a comma list), each checked; facts files
    default to all of theirs."""
    if all_ and relation:
        raise DataError("give either --relation or --all, not both")
    if all_ or (not relation and data.kind == "files"):  # facts files: every relation in them by default
        return list(data.relations)
    ids = [r.strip() for given in relation or [] for r in given.split(",") if r.strip()]
    if not ids:
        raise DataError("no relation given: pass --relation P19 (repeatable, or P19,P20) or --all")
    return [data.relation(rid).id for rid in dict.fromkeys(ids)]


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


def reopen_data(cfg: dict, data: str | None = None) -> FactData:
    """The data a run was made on: `data` if given (the folder moved), else as its config records it."""
    if data is not None:
        return open_data(data)
    spec = cfg.get("data_spec") or {"data": cfg["data"]}
    return open_data(spec.get("data"), spec.get("facts"), fields=spec.get("fields"), dev_split=spec.get("dev_split"),
                     seed=spec.get("seed", 13))


def check_templates(data: FactData, ids: list[str], flag: str) -> None:
    """Every relation asked for has a manual template."""
    missing = [rid for rid in ids if not data.relation(rid).template]
    if missing:
        raise TemplateError(f"relation {missing[0]!r} has no template: give {flag} '[X] ... [Y] .' (one for every relation) "
                            f"or a template file with a '{missing[0]}: [X] ... [Y]' line")


def load_template_spec(spec: str | None, method: str | None = None) -> TemplateFile:
    """`--template`: a template file, an inline template, or None for the default shapes.

    The defaults are the P-tuning shapes, unless the method has its own (prefix-tuning puts its prefix first).
    """
    defaults = dict(get_method(method).default_shapes or DEFAULT_SHAPES) if method else dict(DEFAULT_SHAPES)
    return read_template_spec(spec, defaults) if spec is not None else TemplateFile("<default>", {}, defaults)


def check_new_folder(out: Path | None, resume: bool | None) -> None:
    """An existing run folder is refused without --resume, and a file, a folder of other files or a folder another run
    is writing into are no run folder, before anything is loaded."""
    if out is not None:
        check_own_folder(Path(out))
    if out is not None and not resume and (Path(out) / "config.json").exists():
        raise RunFolderError(f"run folder {out} already exists: pass --resume to continue it, or another --out")


def model_names(opts: Options, several: bool) -> list[str]:
    """--model, given once or (where `several`) more than once; default smollm2."""
    names = list(dict.fromkeys(opts.model or ["smollm2"]))
    if len(names) > 1 and not several:
        raise ModelError("--model is given more than once: several models go in `probe eval` or a sweep grid's model axis")
    return names


def check_model_slugs(names: list[str], where: str) -> None:
    """Several models get a folder (or a cell key) each, named by `slug`: two that would share one are refused."""
    seen: dict[str, str] = {}
    for name in names:
        if slug(name) in seen:
            raise ModelError(f"models {seen[slug(name)]!r} and {name!r} {where} would share the folder name "
                             f"{slug(name)!r}: copy or link one under another name")
        seen[slug(name)] = name


def candidate_choice(opts: Options) -> CandidateChoice:
    """--objects single (LAMA's single-token candidates of --vocab) or any (each relation's objects of any length,
    or those of --candidates), checked before any model loads."""
    objects = opts.objects or "single"
    if objects not in ("single", "any"):
        raise SettingError(f"--objects {objects!r}: expected single (LAMA's one-token objects) or any")
    if objects == "single":
        if opts.candidates is not None or opts.length_norm:
            raise SettingError("--candidates and --length-norm apply to --objects any")
        return CandidateChoice(opts.vocab or "common")
    if opts.vocab is not None:
        raise SettingError("--vocab applies to --objects single: with --objects any the candidates are each relation's "
                           "objects, or --candidates FILE")
    if opts.candidates is not None:
        read_candidates_file(opts.candidates)  # an empty or unreadable file fails here, before any model loads
    spec = ObjectsSpec(str(Path(opts.candidates).resolve()) if opts.candidates is not None else None, bool(opts.length_norm))
    return CandidateChoice("objects", spec)


def check_threads(threads: int | None) -> None:
    if threads is not None:
        check_positive(threads=threads)


def check_pack(pack: int | None, method_cls=None) -> None:
    """--pack is a number of prompts, and applies to methods whose fits can share a pass."""
    if pack is None:
        return
    check_positive(pack=pack)
    if method_cls is not None and not method_cls.packable and pack > 1:
        raise SettingError(f"--pack applies to the methods whose fits share passes of the LM (ptuning, prompt-tuning, "
                           f"autoprompt, ...); {method_cls.name!r} is fit one relation after another")


def make_executor(data: FactData, candidates: CandidateChoice | str, ray: str | None = None,
                  cpus_per_worker: int | None = None, threads: int | None = None, log=print,
                  jobs: int | None = None) -> Executor:
    """Where the cells run: this process (one after another, or --jobs at once), or Ray with --ray (a local Ray,
    'auto', or a cluster address); eval, train and sweep all get theirs here."""
    check_threads(threads)
    if jobs is not None:
        check_positive(jobs=jobs)
    if ray is None:
        if cpus_per_worker is not None:
            raise SettingError("--cpus-per-worker applies to --ray only")
        return InProcess(data, candidates, log=log, threads=threads, jobs=jobs or 1)
    if jobs is not None:
        raise SettingError("--jobs applies in process; with --ray each worker runs one cell at a time (use more workers)")
    return RayExecutor(data, candidates, ray, cpus_per_worker or 1, log=log, threads=threads)
