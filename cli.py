"""The `probe` command line. Every user mistake ends in a one-line `error:` and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from probe.errors import CellsFailed, Interrupted, ProbeError, SettingError
from probe.flags import packable_methods, presets_help, ray_address_default, with_settings

# rich_markup_mode=None: help texts are plain text, so `probe[ray]` and `[X] ... [Y]` print as written
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None,
                  help="Probe what facts a frozen language model knows (LAMA, manual and learned prompts).")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Inspect data folders and facts files; build folders from LAMA's data.zip.")
templates_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect and validate template files.")
app.add_typer(data_app, name="data")
app.add_typer(templates_app, name="templates")

DataOpt = Annotated[str | None, typer.Option("--data", help="LAMA folder (default: $PROBE_DATA, else data/lama).")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'smollm2', a hub id, a local folder or a .gguf file.")]


def _log(message: str) -> None:
    typer.echo(message, err=True)


FactsOpt = Annotated[Path | None, typer.Option(
    help="A JSONL or CSV file of facts of your own (a subject and an object per row; an optional relation field), "
         "or one of LAMA's original files (Google-RE, ConceptNet, SQuAD), instead of --data.")]
FieldsOpt = Annotated[str | None, typer.Option(
    help="The subject and object field names of --facts rows, e.g. company,founder (default: sub_label/obj_label or "
         "subject/object).")]


@data_app.command("info")
def data_info(data: DataOpt = None, facts: FactsOpt = None, fields: FieldsOpt = None) -> None:
    """List the relations: id, label, type (* inferred from the facts), manual template and facts per split."""
    import pandas as pd

    from probe.options import Options, load_data

    lama = load_data(Options(data=data, facts=facts, fields=fields))
    df = lama.info_table()
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 48):
        typer.echo(df.to_string(index=False))
    totals = ", ".join(f"{s} {df[s].sum():,}" for s in lama.splits)
    typer.echo(f"\n{len(df)} relations in {lama.name}; facts (deduplicated): {totals}")


@data_app.command("import")
def data_import(
    source: Annotated[Path, typer.Argument(help="LAMA's data.zip, or the folder it unpacks to.")],
    out: Annotated[Path, typer.Option(help="Where to build the facts folders (trex/, google_re/, conceptnet/, squad/).")],
    train_dev: Annotated[Path | None, typer.Option(
        help="AutoPrompt / P-tuning's T-REx train and dev splits (a folder of P19/train.jsonl, P19/dev.jsonl, ...).")] = None,
) -> None:
    """Build probe facts folders from LAMA's data.zip layout; each can then be given as --data."""
    from probe.lama_import import import_lama

    summary = import_lama(source, out, train_dev, log=_log)
    typer.echo("\n".join(summary.lines()))


RunModelOpt = Annotated[list[str] | None, typer.Option(
    "--model", "-m", help="'smollm2' (default), a hub id, a local folder or a .gguf file.")]
EvalModelOpt = Annotated[list[str] | None, typer.Option(
    "--model", "-m", help="'smollm2' (default), a hub id, a local folder or a .gguf file; repeat it for several models "
                          "(one run folder each, under --out).")]
RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="[ADDRESS]", help="Run the relations on Ray: --ray alone starts a local Ray, --ray auto joins the "
                                       "running cluster, or give HOST:PORT (needs probe[ray]).")]
CpusOpt = Annotated[int | None, typer.Option(help="With --ray and no GPUs: CPUs (and torch threads) per worker (default 1).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    help="torch's CPU threads per process that computes (default: torch's own in process, divided among --jobs; "
         "--cpus-per-worker on Ray). "
         "CPU sums, so bfloat16 figures and a training run's path, depend on it; the run records it.")]
JobsOpt = Annotated[int | None, typer.Option(
    "--jobs", "-j", help="Cells (relations, sweep cells) run at once in this process, each on its own thread against "
                         "the one loaded model, torch's CPU threads shared among them (default 1: one after another). "
                         "On a CPU with N cores, --jobs N runs N fits at once with one torch thread each, as --ray's "
                         "workers do, without Ray. CPU only; finetune and prefix-tuning fits run alone.")]
PACKABLE = packable_methods()
PackOpt = Annotated[int | None, typer.Option(
    "--pack", help=f"Prompts trained at once in one pass of the LM ({', '.join(PACKABLE[True])}; `probe train` refuses "
                   f"it for {', '.join(PACKABLE[False])}, a sweep fits their cells one by one; default 1 "
                   "on a CPU, where a pack gains little, 64 on a GPU, fewer if its memory says so). --pack 1 fits one "
                   "relation after another; the figures of a pack's relations may move by float rounding with the "
                   "pack.")]
ReportToOpt = Annotated[list[str] | None, typer.Option(
    "--report-to", metavar="TRACKER",
    help="Report each fit's train log (loss, lr, dev figures at every check) and test figures, and the run's config, "
         "to an experiment tracker: tensorboard (event files in RUN/tensorboard), mlflow (RUN/mlruns, or "
         "$MLFLOW_TRACKING_URI), wandb (offline in RUN/wandb unless $WANDB_MODE), or none (default). Repeatable; each "
         "needs its extra, e.g. pip install 'probe[mlflow]'.")]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", help="Place the model over several devices with accelerate's device map, at most this much on "
                         "each: 0:70GiB,1:70GiB (and cpu:200GiB to spill over). Several GPUs are used by themselves "
                         "with --device auto or cuda.")]
RunDeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="auto (default: a GPU when there is one, else the CPU), cpu, cuda or cuda:N.")]
RunDtypeOpt = Annotated[str | None, typer.Option("--dtype", help="bfloat16 (default), float32 or float16 for the LM weights.")]
RelationOpt = Annotated[list[str] | None, typer.Option(
    "--relation", "-r", help="Relation id, e.g. P19; repeat it or give a comma list (P19,P20).")]
AllOpt = Annotated[bool | None, typer.Option("--all", help="Every T-REx relation.", show_default=False, metavar="")]
SplitOpt = Annotated[str | None, typer.Option(
    help="test_34k (default; alias test), test_29k, dev or train; with --consistency also pararel (ParaRel's facts, "
         "its default).")]
VocabOpt = Annotated[str | None, typer.Option(
    help="Candidate vocabulary: common (default, LAMA's), 29k (P-tuning's), objects (every object of the facts), or a "
         "file of your own (one word a line).")]
OutOpt = Annotated[Path | None, typer.Option(help="Run folder (default runs/<method>-<model>-<time>).")]
ResumeOpt = Annotated[bool | None, typer.Option("--resume", help="Continue an existing run folder, skipping finished "
                                                "relations.", show_default=False, metavar="")]
ObjectsOpt = Annotated[str | None, typer.Option(
    "--objects", help="single (default): LAMA's protocol, objects that are one token of --vocab; any: every fact, ranking "
                      "the relation's candidate objects of any length by their log-likelihood.")]
CandidatesOpt = Annotated[Path | None, typer.Option(
    "--candidates", help="With --objects any: candidate objects, one a line (for every relation) or JSONL with relation "
                         "and object (default: each relation's objects across train, dev and test).")]
LengthNormOpt = Annotated[bool | None, typer.Option(
    "--length-norm", show_default=False, metavar="",
    help="With --objects any: divide a candidate's log-likelihood by its token count.")]

def _run(command, options, **given) -> None:
    """Run a command's entry of the Python API (probe.api.eval_command, train_command) and print what it returns;
    Ctrl-C keeps what finished, says where, and exits 130; failed cells exit 1."""
    try:
        result = command(options, log=_log, **given)
    except Interrupted as e:
        typer.echo(f"interrupted: finished relations are saved in {e.folder}; rerun with --resume to continue", err=True)
        raise typer.Exit(130) from None
    except CellsFailed as e:
        typer.echo(f"error: {e}; the others are saved, rerun with --resume to retry these", err=True)
        raise typer.Exit(1) from None
    for text in result.lines():
        typer.echo(text)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("eval")
def eval_cmd(
    model: EvalModelOpt = None,
    method: Annotated[str | None, typer.Option(help="manual (default): the relation's manual template.")] = None,
    relation: RelationOpt = None,
    all_: AllOpt = None,
    split: SplitOpt = None,
    vocab: VocabOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Facts per batch (default 128).")] = None,
    device: RunDeviceOpt = None,
    dtype: RunDtypeOpt = None,
    prompts: Annotated[Path | None, typer.Option(
        help="Run folder of `probe train`: re-evaluate its saved prompts. Or a PEFT prompt adapter folder (prompt, "
             "P- or prefix-tuning), or a folder of them named by relation: evaluate them on --split, virtual tokens "
             "first.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        help="Fixed [X] ... [Y] prompts: a .jsonl of {relation, template}, a 'P19<TAB>template' text file, "
             "or a folder of P*.jsonl / P*.txt (LPAQA, ParaRel).")] = None,
    ensemble: Annotated[bool | None, typer.Option("--ensemble", show_default=False, metavar="",
        help="With --prompts-file: combine a relation's prompts (weighted mean of candidate log-softmax).")] = None,
    max_prompts: Annotated[int | None, typer.Option(
        help="Prompts per relation from --prompts-file (default: 1, all with --ensemble; 0: all).")] = None,
    control: Annotated[str | None, typer.Option(
        help="random-model: the same LM with re-drawn weights (seeded by --seed); majority: rank candidates by their "
             "train counts, without the LM.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of --control random-model (default 13).")] = None,
    facts: FactsOpt = None,
    fields: FieldsOpt = None,
    template: Annotated[str | None, typer.Option(
        help="The relations' templates: one inline '[X] was founded by [Y] .' for all, or a template file keyed by "
             "relation (e.g. templates/google_re.txt).")] = None,
    from_sentences: Annotated[bool | None, typer.Option(
        "--from-sentences", show_default=False, metavar="",
        help="Evaluate each fact's cloze sentence (LAMA's masked_sentences) instead of a template; a causal LM sees "
             "only the text before [MASK].")] = None,
    objects: ObjectsOpt = None,
    candidates: CandidatesOpt = None,
    length_norm: LengthNormOpt = None,
    ray: RayOpt = None,
    cpus_per_worker: CpusOpt = None,
    threads: ThreadsOpt = None,
    jobs: JobsOpt = None,
    max_memory: MaxMemoryOpt = None,
    allow_download: Annotated[bool | None, typer.Option(
        "--allow-download", show_default=False, metavar="",
        help="With --prompts: load the hub model the run folder names (otherwise only a model named with --model or "
             "one on this machine).")] = None,
    score: Annotated[str | None, typer.Option(
        help="object (default for LAMA and facts folders): rank objects by their log-likelihood after the prompt; "
             "statement (default for a BEAR folder): by the whole filled template's, on each of the relation's "
             "templates, as LM Pub Quiz.")] = None,
    reduction: Annotated[str | None, typer.Option(
        help="With --score statement: sum (default, LM Pub Quiz's) or mean of the statement's token log-likelihoods.")
    ] = None,
    consistency: Annotated[bool | None, typer.Option(
        "--consistency", show_default=False, metavar="",
        help="ParaRel consistency: every pattern of --prompts-file (default: the LAMA folder's prompts/pararel) on the "
             "same facts (ParaRel's own by default), ranking each relation's objects; the graphs are read from "
             "<prompts-file>_graphs. With --prompts RUN, the run's trained prompt is one more node.")] = None,
) -> None:
    """Evaluate fixed prompts on one or all relations with one model load; print and save the table."""
    from probe.api import eval_command
    from probe.options import Options

    options = Options(model=model, method=method, relation=relation, all=all_, split=split, vocab=vocab, data=data,
                      out=out, resume=resume, batch_size=batch_size, device=device, dtype=dtype, prompts=prompts,
                      prompts_file=prompts_file, ensemble=ensemble, max_prompts=max_prompts, control=control, seed=seed,
                      facts=facts, fields=fields, template=template, from_sentences=from_sentences, ray=ray,
                      cpus_per_worker=cpus_per_worker, threads=threads, jobs=jobs, objects=objects,
                      candidates=candidates, length_norm=length_norm, max_memory=max_memory,
                      allow_download=allow_download, score=score, reduction=reduction)
    _run(eval_command, options, consistency=bool(consistency))


@app.command("train")
@with_settings
def train_cmd(
    model: RunModelOpt = None,
    method: Annotated[str | None, typer.Option(
        help="ptuning (default), ptuning-mlp, prompt-tuning, prefix-tuning, autoprompt, or finetune (every LM weight "
             "trains, on the manual template: the ceiling). The README lists each with its options.")] = None,
    relation: RelationOpt = None,
    all_: AllOpt = None,
    template: Annotated[str | None, typer.Option(
        help="Template file (see templates/) or inline shape; default (3,sub,3,obj,3) masked, (3,sub,3,obj) causal "
             "((6,sub,obj) for prefix-tuning).")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="A method option as NAME=VALUE (repeatable), e.g. -o init=template: any option the "
                               "method declares (--init and --reparam are two of them).")] = None,
    split: Annotated[str | None, typer.Option(help="Test split: test_34k (default; alias test) or test_29k.")] = None,
    vocab: VocabOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = None,
    preset: Annotated[str | None, typer.Option(help=presets_help())] = None,
    fallback: Annotated[str | None, typer.Option(
        help="manual: a relation whose trained prompt is below its manual prompt on dev keeps the manual prompt "
             "(the results say so per relation). Default: keep the trained prompt, flagged below_manual.")] = None,
    device: RunDeviceOpt = None,
    dtype: RunDtypeOpt = None,
    control: Annotated[str | None, typer.Option(
        help="random-model: the same LM with re-drawn weights (seeded by --seed), a control for what is learned, "
             "not known.")] = None,
    facts: Annotated[Path | None, typer.Option(help="Test facts of your own (JSONL or CSV), instead of --data.")] = None,
    train_facts: Annotated[Path | None, typer.Option(help="Train facts of your own (JSONL or CSV).")] = None,
    dev_facts: Annotated[Path | None, typer.Option(help="Dev facts of your own, for selection and early stopping.")] = None,
    dev_split: Annotated[float | None, typer.Option(
        help="Without --dev-facts: hold out this share of --train-facts as dev (seeded by --seed), e.g. 0.2.")] = None,
    fields: FieldsOpt = None,
    manual_template: Annotated[str | None, typer.Option(
        help="Your facts' manual templates (for the manual baseline and the `manual` shape part): one inline "
             "'[X] ... [Y] .' or a template file keyed by relation.")] = None,
    save_model: Annotated[bool | None, typer.Option(
        "--save-model", show_default=False, metavar="",
        help="finetune: also save each relation's fine-tuned LM weights (RELATION/model.safetensors).")] = None,
    objects: ObjectsOpt = None,
    candidates: CandidatesOpt = None,
    length_norm: LengthNormOpt = None,
    ray: RayOpt = None,
    cpus_per_worker: CpusOpt = None,
    threads: ThreadsOpt = None,
    jobs: JobsOpt = None,
    pack: PackOpt = None,
    max_memory: MaxMemoryOpt = None,
    allow_overlap: Annotated[bool | None, typer.Option(
        "--allow-overlap", show_default=False, metavar="",
        help="Test facts that are also train or dev facts, without the warning (the overlap is recorded in "
             "config.json either way).")] = None,
    report_to: ReportToOpt = None,
    settings: dict | None = None,
) -> None:
    """Train a prompt per relation against the frozen LM, then test it next to the manual prompt. The method's settings
    (--lr, --epochs, --iterations, --init, ...) are listed last, each with the methods that take it."""
    from probe.api import train_command
    from probe.options import Options

    _run(train_command, Options(
        model=model, method=method, relation=relation, all=all_, template=template, option=option, threads=threads,
        jobs=jobs, pack=pack, max_memory=max_memory, preset=preset, fallback=fallback, allow_overlap=allow_overlap,
        split=split, vocab=vocab,
        data=data, out=out, resume=resume, device=device, dtype=dtype, control=control, facts=facts,
        train_facts=train_facts, dev_facts=dev_facts, dev_split=dev_split, fields=fields,
        manual_template=manual_template, save_model=save_model, ray=ray, cpus_per_worker=cpus_per_worker,
        objects=objects, candidates=candidates, length_norm=length_norm, report_to=report_to, settings=settings))


@app.command("compare")
def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folders, or folders holding run folders; a sweep folder draws its P@1 against prompt length, the "
             "runs given as reference lines.")],
    out: Annotated[Path | None, typer.Option(help="Where to save compare.csv, compare.md and the plots "
                                                  "(default runs/compare-<time>).")] = None,
    allow_mixed: Annotated[bool, typer.Option(help="Compare runs of different models, vocabularies or splits.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the comparison in an existing --out.")] = False,
) -> None:
    """One table of methods against relations (P@1), macro/micro on the shared relations, gain over manual, plots."""
    from probe.commands.compare import compare_command

    compare_command(runs, out, allow_mixed, force, typer.echo, _log)


@app.command("explain")
def explain_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder of ptuning, ptuning-mlp, prompt-tuning or prefix-tuning.")],
    relation: Annotated[list[str] | None, typer.Option("--relation", "-r", help="Only these relations.")] = None,
    k: Annotated[int, typer.Option("-k", help="Nearest vocabulary tokens per virtual token.")] = 5,
    data: DataOpt = None,
) -> None:
    """Nearest vocabulary tokens (cosine) of each learned virtual token; saves explain.json in the run folder.

    Prefix-tuning learns no input vectors: its virtual tokens are read through their layer-0 keys and values,
    next to those of each vocabulary token on its own.
    """
    from probe.explain import explain_run

    path = explain_run(run_dir, relation, k, data, log=typer.echo)
    typer.echo(f"saved {path}")


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder of `probe train` (a causal LM, a trained prompt).")],
    to: Annotated[str, typer.Option("--to", help="The format: peft (PEFT adapter folders, probe[peft] loads them).")],
    out: Annotated[Path, typer.Option(help="A new or empty folder (or one probe exported into): one adapter per "
                                           "relation in <out>/<relation>/.")],
    relation: RelationOpt = None,
) -> None:
    """Write a run's trained prompts as PEFT adapters: prompt-tuning, P-tuning and AutoPrompt as PROMPT_TUNING,
    prefix-tuning as PREFIX_TUNING, with probe_prompt.json beside each (the input text, [X] the subject)."""
    from probe.peft_adapters import export_peft

    if to != "peft":
        raise SettingError(f"--to {to!r}: expected peft")
    ids = [r.strip() for given in relation or [] for r in given.split(",") if r.strip()]
    for folder in export_peft(run_dir, out, ids or None, log=_log):
        typer.echo(f"wrote {folder}")


@templates_app.command("check")
def templates_check(
    file: Annotated[Path, typer.Argument(help="A template file (see templates/).")],
) -> None:
    """Validate a template file; print its entries."""
    from probe.commands.templates import check_template_file

    check_template_file(file, typer.echo, _log)


@templates_app.command("show")
def templates_show(
    file: Annotated[str, typer.Argument(help="Template file or inline template.")],
    model: ModelOpt = "smollm2",
    relation: Annotated[str, typer.Option("--relation", "-r", help="The relation whose first test fact is shown.")] = "P19",
    data: DataOpt = None,
) -> None:
    """Print what the model sees for a relation's first test fact; virtual tokens as [V1]..[Vn]."""
    from probe.commands.templates import show_template

    show_template(str(file), model, relation, data, typer.echo)


@app.command("sweep")
def sweep_cmd(
    grid: Annotated[Path, typer.Argument(help="A sweep grid file (TOML; see sweeps/).")],
    out: Annotated[Path | None, typer.Option(help="Sweep folder (default runs/sweep-<grid name>); "
                                                  "rerunning into it skips finished cells.")] = None,
    data: DataOpt = None,
    device: RunDeviceOpt = None,
    ray: RayOpt = None,
    cpus_per_worker: CpusOpt = None,
    threads: ThreadsOpt = None,
    jobs: JobsOpt = None,
    pack: PackOpt = None,
    report_to: ReportToOpt = None,
) -> None:
    """Train every cell of a grid (model x method x length x method options x seed x relation); tables of mean ± std
    over seeds."""
    from probe.sweep import sweep_command

    try:
        summary = sweep_command(grid, out, data, device, log=_log, ray=ray, cpus_per_worker=cpus_per_worker,
                                threads=threads, pack=pack, jobs=jobs, report_to=report_to)
    except Interrupted as e:
        typer.echo(f"interrupted: finished cells are saved in {e.folder}; rerun the same command to continue", err=True)
        raise typer.Exit(130) from None
    except CellsFailed as e:
        typer.echo(f"error: {e}; the others are saved, rerun the same command to retry these", err=True)
        raise typer.Exit(1) from None
    if summary.exists():
        typer.echo(summary.read_text(encoding="utf-8"))
    typer.echo(f"saved {summary.parent}")


def _version(value: bool) -> None:
    if value:
        from probe import __version__

        typer.echo(f"probe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Probe what facts a frozen language model knows (LAMA, manual and learned prompts)."""


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C exits 130."""
    sys.argv[1:] = ray_address_default(sys.argv[1:])
    train_cmd.refresh()  # the method settings' flags, of every method registered now
    try:
        app()
    except ProbeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
