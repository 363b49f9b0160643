"""Runs and fits, resolved.

`FitSpec` is what one prompt's fit is (method, its options, its fit settings, templates, fallback, seed), made by one
function, `resolve_fit`, from `probe train`'s flags, a sweep grid's cell or `probe.train`'s keywords; a sweep is a list
of them (one per setting and seed). `RunSpec` is a `probe train` run (model, data, relations, split, candidates, the
fit, the folder, the executor), made by `resolve_train` from the flags or `probe.train`'s arguments. Every default is
taken and every check made there, before any folder is made or any model loads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probe.controls import CONTROLS, Control, get_control
from probe.data import FactData
from probe.errors import DataError, ProbeError, SettingError, TemplateError, check_positive
from probe.fit import config_fields
from probe.methods import MethodConfig, PromptMethod, get_method, method_config, parse_options
from probe.options import (
    RUN_FLAGS,
    Options,
    candidate_choice,
    check_model_slugs,
    check_new_folder,
    check_pack,
    check_templates,
    load_data,
    load_template_spec,
    model_names,
    relation_ids,
)
from probe.prompt_files import read_prompts
from probe.runs import default_out, slug
from probe.template_files import TemplateFile
from probe.tracking import check_report_to
from probe.vocab import CandidateChoice

EVAL_FLAGS = RUN_FLAGS | {"batch_size", "seed", "prompts_file", "ensemble", "max_prompts", "template", "from_sentences",
                         "score"}
PROMPT_FLAGS = {"method", "prompts_file", "ensemble", "max_prompts", "template", "from_sentences"}
TRAIN_FLAGS = RUN_FLAGS | {"template", "option", "train_facts", "dev_facts", "dev_split", "manual_template", "save_model",
                           "pack", "fallback", "preset", "allow_overlap", "report_to"}

FALLBACKS = ("manual",)  # what a prompt below the manual prompt on dev gives way to


def check_fallback(fallback: str | None) -> None:
    """--fallback is None or one of FALLBACKS."""
    if fallback is not None and fallback not in FALLBACKS:
        raise SettingError(f"--fallback {fallback!r}: expected {' or '.join(FALLBACKS)} (the relation's manual prompt "
                           "where the trained one is below it on dev)")


@dataclass(frozen=True)
class FitSpec:
    """One fit, resolved and checked: the method, its options (`config`), its fit settings (`fit_config`), the
    templates it fits (--template, else the method's default shapes), the fallback, and the LM dtype it needs."""

    method: str
    config: MethodConfig
    fit_config: Any
    templates: TemplateFile
    fallback: str | None = None
    dtype: str | None = None  # the LM dtype the method needs (finetune: float32), else None: any

    @property
    def method_class(self) -> type[PromptMethod]:
        return get_method(self.method)

    @property
    def seed(self) -> int:
        return self.fit_config.seed


def fittable_method(name: str) -> type[PromptMethod]:
    """The class of a method that can be trained; one that cannot is a ProbeError."""
    method_cls = get_method(name)
    if not method_cls.can_fit():
        raise SettingError(f"method {name!r} has nothing to train: use `probe eval --method {name}`")
    return method_cls


def resolve_fit(method: str | None, settings: Mapping[str, Any] | None = None, *, preset: str | None = None,
                template: str | None = None, template_given: bool | None = None, fallback: str | None = None,
                dtype: str | None = None) -> FitSpec:
    """The FitSpec of a method (default ptuning) with its settings by name (its options and its fit settings; None:
    the default), a --preset of fit settings, a --template, a --fallback and the LM's --dtype; any mistake is a
    ProbeError with the CLI's message. `template_given`: whether the template counts as given (a sweep's length
    axis does), else whether `template` is."""
    method = method or "ptuning"
    method_cls = fittable_method(method)
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    option_names = {f.name for f in method_cls.config_class.options()}
    fit_names = config_fields(method_cls.fit_config_class)
    extra = sorted(set(settings) - option_names - fit_names)
    if extra:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in extra)
        raise SettingError(f"{flags} {'does' if len(extra) == 1 else 'do'} not apply to method {method!r}")
    config = method_config(method, **{k: v for k, v in settings.items() if k in option_names})
    method_cls.check_settings(config, template is not None if template_given is None else template_given)
    check_fallback(fallback)
    if method_cls.lm_dtype is not None and dtype not in (None, method_cls.lm_dtype):
        raise SettingError(f"method {method!r} trains the LM's weights in {method_cls.lm_dtype}: --dtype {dtype} does "
                           "not apply")
    try:
        fit_config = method_cls.fit_config(preset, **{k: v for k, v in settings.items() if k in fit_names})
    except TypeError as e:  # a value of the wrong kind for a fit setting
        raise SettingError(f"method {method!r}: {e}") from None
    return FitSpec(method, config, fit_config, load_template_spec(template, method), fallback, method_cls.lm_dtype)


@dataclass(frozen=True)
class RunSpec:
    """A `probe train` run, resolved and checked: the model (name, device and dtype as asked, control), the data and
    its relations, the test split, the candidates, the fit, the run folder, and where the cells run."""

    model: str
    device: str | None
    dtype: str | None  # the method's (finetune: float32), else as asked (None: bfloat16)
    control: Control
    data: FactData
    relations: tuple[str, ...]
    split: str
    candidates: CandidateChoice
    fit: FitSpec
    out: Path | None = None
    resume: bool = False
    save_model: bool = False
    template_file: str | None = None
    ray: str | None = None
    cpus_per_worker: int | None = None
    threads: int | None = None
    jobs: int | None = None
    pack: int | None = None
    max_memory: str | None = None
    allow_overlap: bool = False  # test facts that are also train or dev facts, accepted without a warning
    report_to: tuple[str, ...] = ()  # experiment trackers (probe/tracking.py), checked installed


def given_settings(opts: Options, method: str) -> dict:
    """The method's settings as given: their flags (--lr, --init, ...) and --option NAME=VALUE (a method option)."""
    pairs = parse_options(opts.option)
    takes = {f.name for f in get_method(method).config_class.options()}
    for name in pairs:
        if name not in takes:
            method_config(method, **{name: pairs[name]})  # the method's own error: what it takes
    settings = opts.method_settings()
    for name in pairs:
        if name in settings:
            raise SettingError(f"--{name.replace('_', '-')} is given twice (also as --option {name}=...)")
    return {**settings, **pairs}


def resolve_train(opts: Options) -> RunSpec:
    """`probe train`'s flags (or `probe.train`'s arguments) as a RunSpec: every check that needs no model."""
    method = opts.method or "ptuning"
    method_cls = fittable_method(method)
    opts.refuse(TRAIN_FLAGS | set(opts.method_settings()), f"method {method!r}")
    control = get_control(opts.control)
    if not control.trainable:
        trainable = ", ".join(n for n, c in CONTROLS.items() if c.trainable)
        raise SettingError(f"--control {control.name!r} does not apply to `probe train`: expected one of {trainable}")
    (name,) = model_names(opts, several=False)
    fit = resolve_fit(method, given_settings(opts, method), preset=opts.preset, template=opts.template,
                      fallback=opts.fallback, dtype=opts.dtype)
    if opts.save_model and not method_cls.trains_lm:
        raise SettingError(f"--save-model applies to methods that train the LM's weights; {method!r} trains a prompt, "
                           "which every run saves")
    check_pack(opts.pack, method_cls)
    if (opts.jobs or 1) > 1 and not method_cls.beside_others:
        raise SettingError(f"--jobs runs fits beside each other on one LM; method {method!r} changes the LM while it fits, "
                           "so its relations run one after another (leave --jobs out)")
    trackers = check_report_to(opts.report_to)
    check_new_folder(opts.out, opts.resume)
    data = load_data(opts, opts.manual_template, fit.seed)
    split = data.split_name(opts.split)
    if split not in data.test_splits:
        raise DataError(f"--split {split!r}: a trained prompt is tested on {' or '.join(data.test_splits)}, never on "
                        "train or dev")
    ids = relation_ids(data, opts.relation, opts.all)
    check_templates(data, ids, "--manual-template")
    return RunSpec(name, opts.device, fit.dtype or opts.dtype, control, data, tuple(ids), split, candidate_choice(opts),
                   fit, opts.out, bool(opts.resume), bool(opts.save_model), opts.template, opts.ray, opts.cpus_per_worker,
                   opts.threads, opts.jobs, opts.pack, opts.max_memory, bool(opts.allow_overlap), tuple(trackers))


@dataclass(frozen=True)
class EvalSpec:
    """A `probe eval` run, resolved and checked: its models (one run folder each), the data and relations, the split,
    the candidates, the prompts (the manual template, chosen prompts of a prompts file, cloze sentences) or the
    control, the run folder(s) and where the cells run."""

    models: tuple[str, ...]
    control: Control
    method: str | None  # manual, discrete (a prompts file), None (a control without the LM)
    name: str  # the default run folder's name
    data: FactData
    relations: tuple[str, ...]
    split: str
    candidates: CandidateChoice
    batch_size: int = 128
    seed: int | None = None
    chosen: dict | None = None  # relation -> its DiscretePrompts, from --prompts-file
    prompts_file: Path | None = None
    prompts_info: tuple = ()  # what the run config records of the prompts file, as items
    ensemble: bool = False
    max_prompts: int = 1
    from_sentences: bool = False
    out: Path | None = None
    resume: bool = False
    device: str | None = None
    dtype: str | None = None
    ray: str | None = None
    cpus_per_worker: int | None = None
    threads: int | None = None
    jobs: int | None = None
    max_memory: str | None = None


def resolve_eval(opts: Options, log=print) -> EvalSpec:
    """`probe eval`'s flags (or `probe.evaluate`'s arguments) as an EvalSpec: every check that needs no model."""
    if opts.prompts is not None:
        raise ProbeError("internal: saved prompts go through rerun_prompts")
    opts.refuse(EVAL_FLAGS, "`probe eval`")
    control = get_control(opts.control)
    method = opts.method or "manual"
    if method in CONTROLS:
        raise SettingError(f"{method} is a control, not a method: use --control {method}")
    method_cls = get_method(method)
    if method_cls.can_fit():
        raise SettingError(f"method {method!r} is trained: use `probe train --method {method}`, then `probe eval --prompts RUN`")
    if not control.uses_lm:
        opts.refuse(EVAL_FLAGS - PROMPT_FLAGS - {"seed"}, f"--control {control.name} ({control.summary}, with no prompt)")
    if opts.seed is not None and not control.seeded:
        seeded = " or ".join(n for n, c in CONTROLS.items() if c.seeded)
        raise SettingError(f"--seed applies to --control {seeded} only (a fixed prompt has nothing random)")
    seed = (13 if opts.seed is None else opts.seed) if control.seeded else None
    if opts.prompts_file is None and (opts.ensemble or opts.max_prompts is not None):
        raise SettingError("--ensemble and --max-prompts need --prompts-file")
    max_prompts = opts.max_prompts if opts.max_prompts is not None else (0 if opts.ensemble else 1)
    if max_prompts < 0 or (max_prompts != 1 and not opts.ensemble):
        raise SettingError(f"--max-prompts {max_prompts}: several prompts per relation need --ensemble (0 means all)")
    batch_size = 128 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    if opts.from_sentences and (opts.prompts_file is not None or opts.template is not None):
        raise SettingError("--from-sentences evaluates each fact's cloze sentence: it does not go with --template or "
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
            raise TemplateError(f"prompts file {opts.prompts_file} has no prompt for the relations asked for")
        if len(chosen) < len(ids):
            log(f"warning: no prompt in {opts.prompts_file} for {', '.join(r for r in ids if r not in chosen)}; skipped")
        ids = list(chosen)
        method = "discrete"
        prompts_info = {"prompts_file": str(Path(opts.prompts_file).resolve()), "prompts_format": prompt_set.format,
                        "ensemble": bool(opts.ensemble), "prompts_per_relation": {r: len(p) for r, p in chosen.items()}}
    if not control.uses_lm:
        method = None
    name = f"discrete-{slug(Path(opts.prompts_file).stem)}" if chosen else (method or control.name)
    name += "-cloze" if opts.from_sentences else ""
    name += "-any" if choice.objects else ""
    return EvalSpec(tuple(names), control, method, name, data, tuple(ids), split, choice, batch_size, seed, chosen,
                    opts.prompts_file, tuple(prompts_info.items()), bool(opts.ensemble), max_prompts,
                    bool(opts.from_sentences), out, bool(opts.resume), opts.device, opts.dtype, opts.ray,
                    opts.cpus_per_worker, opts.threads, opts.jobs, opts.max_memory)
