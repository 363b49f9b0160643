"""The `probe` command line. Every user mistake ends in a one-line `error:` and exit code 2."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from probe.errors import ProbeError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Probe what facts a frozen language model knows (LAMA, manual and learned prompts).")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the LAMA data folder.")
templates_app = typer.Typer(no_args_is_help=True, help="Inspect and validate template files.")
app.add_typer(data_app, name="data")
app.add_typer(templates_app, name="templates")

DataOpt = Annotated[str | None, typer.Option("--data", help="LAMA folder (default: $PROBE_DATA, else data/lama).")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'smollm2', a hub id, a local folder or a .gguf file.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16 for the LM weights.")]
ControlOpt = Annotated[str, typer.Option(
    help="random-model: the same LM with re-drawn weights (seeded), a control for what is learned, not known.")]


def _relation_ids(data, relation: list[str] | None, all_: bool) -> list[str]:
    if all_ and relation:
        raise ProbeError("give either --relation or --all, not both")
    if all_:
        return list(data.relations)
    if not relation:
        raise ProbeError("no relation given: pass --relation P19 (repeatable) or --all")
    for rid in relation:
        data.relation(rid)
    return list(dict.fromkeys(relation))


def _positive(**options: int) -> None:
    for name, value in options.items():
        if value < 1:
            raise ProbeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _interrupted(run) -> None:
    """Ctrl-C: keep what finished, say where, exit 130."""
    run.write_summary()
    typer.echo(f"interrupted: finished relations are saved in {run.root}; rerun with --resume to continue", err=True)
    raise typer.Exit(130)


def _print_results(results: dict) -> None:
    from probe.runs import relations_table, summary_table

    rel = relations_table(results["relations"])
    typer.echo(rel.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    typer.echo("")
    typer.echo("macro = mean over relations, micro = mean over facts; P@k in %, MRR as a fraction")
    typer.echo(summary_table(results["summary"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if "summary_manual" in results:
        typer.echo("\nthe manual prompt on the same facts:")
        typer.echo(summary_table(results["summary_manual"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@data_app.command("info")
def data_info(data: DataOpt = None) -> None:
    """List the T-REx relations: id, label, type, manual template and facts per split."""
    import pandas as pd

    from probe.data import SPLITS, LamaData

    lama = LamaData(data)
    rows = []
    for r in lama.relations.values():
        counts = {s: len(lama.facts(r.id, s)) for s in SPLITS}
        rows.append({"relation": r.id, "label": r.label, "type": r.type, "template": r.template, **counts})
    df = pd.DataFrame(rows)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 48):
        typer.echo(df.to_string(index=False))
    totals = ", ".join(f"{s} {df[s].sum():,}" for s in SPLITS)
    typer.echo(f"\n{len(df)} relations in {lama.root}; facts (deduplicated): {totals}")


@app.command("eval")
def eval_cmd(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="'smollm2' (default), a hub id, a local folder or a .gguf file.")] = None,
    method: Annotated[str, typer.Option(help="manual, or majority (the majority-class control).")] = "manual",
    relation: Annotated[list[str] | None, typer.Option("--relation", "-r", help="Relation id, e.g. P19.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Evaluate every T-REx relation.")] = False,
    split: Annotated[str, typer.Option(help="test_34k (alias test), test_29k, dev or train.")] = "test_34k",
    vocab: Annotated[str, typer.Option(help="Candidate vocabulary: common or 29k.")] = "common",
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<method>-<model>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an existing run folder, skipping finished relations.")] = False,
    batch_size: Annotated[int, typer.Option(help="Facts per batch.")] = 128,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "bfloat16",
    prompts: Annotated[Path | None, typer.Option(help="Run folder of `probe train`: re-evaluate its saved prompts.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        help="Fixed [X] ... [Y] prompts: a .jsonl of {relation, template}, a 'P19<TAB>template' text file, "
             "or a folder of P*.jsonl / P*.txt (LPAQA, ParaRel).")] = None,
    ensemble: Annotated[bool, typer.Option(
        help="With --prompts-file: combine a relation's prompts (weighted mean of candidate log-softmax).")] = False,
    max_prompts: Annotated[int | None, typer.Option(
        help="Prompts per relation from --prompts-file (default: 1, all with --ensemble; 0: all).")] = None,
    control: ControlOpt = "none",
    seed: Annotated[int, typer.Option(help="Seed of --control random-model.")] = 13,
) -> None:
    """Evaluate a prompt method on one or all relations with one model load; print and save the table."""
    if prompts is not None:
        return _eval_prompts(prompts, model, data, batch_size, device)
    if prompts_file is None and (ensemble or max_prompts is not None):
        raise ProbeError("--ensemble and --max-prompts need --prompts-file")
    if prompts_file is not None and method != "manual":
        raise ProbeError(f"--prompts-file evaluates fixed prompts: it does not go with --method {method}")
    if max_prompts is None:
        max_prompts = 0 if ensemble else 1
    if max_prompts < 0 or (max_prompts != 1 and not ensemble):
        raise ProbeError(f"--max-prompts {max_prompts}: several prompts per relation need --ensemble (0 means all)")
    model = model or "smollm2"
    from probe.backends import load_backend
    from probe.data import SPLIT_ALIASES, LamaData
    from probe.methods import get_method
    from probe.pipeline import EvalSettings, evaluate_relations, relation_facts, run_config
    from probe.prompt_files import read_prompts
    from probe.runs import RunFolder
    from probe.vocab import build_candidates

    t0 = time.time()
    _positive(batch_size=batch_size)
    if get_method(method).trainable:
        raise ProbeError(f"method {method!r} is trained: use `probe train --method {method}`, then `probe eval --prompts RUN`")
    lama = LamaData(data)
    ids = _relation_ids(lama, relation, all_)
    split = SPLIT_ALIASES.get(split, split)
    lama.facts(ids[0], split)  # validates the split name before the model loads
    chosen, extra = None, {}
    if prompts_file is not None:  # a bad prompt or relation id fails before the model loads
        prompt_set = read_prompts(prompts_file)
        prompt_set.check_relations(lama.relations)
        chosen = prompt_set.chosen(ids, max_prompts, strict=relation is not None)
        if not chosen:
            raise ProbeError(f"prompts file {prompts_file} has no prompt for the relations asked for")
        if len(chosen) < len(ids):
            typer.echo(f"warning: no prompt in {prompts_file} for {', '.join(r for r in ids if r not in chosen)}; skipped",
                       err=True)
        ids = list(chosen)
        extra = {"method": "discrete", "template_file": str(prompts_file), "prompts_file": str(prompts_file.resolve()),
                 "prompts_format": prompt_set.format, "ensemble": ensemble,
                 "method_config": {"ensemble": ensemble, "max_prompts": max_prompts},
                 "prompts_per_relation": {rid: len(p) for rid, p in chosen.items()}}
    words = lama.vocab_words(vocab)
    backend = load_backend(model, device=device, dtype=dtype, control=control, seed=seed)
    candidates = build_candidates(backend.tokenizer, words)
    if len(ids) == 1:
        relation_facts(lama, lama.relation(ids[0]), split, candidates, strict=True)
    typer.echo(
        f"{model} ({backend.kind} LM, {backend.dtype}) loaded in {time.time() - t0:.1f}s; "
        f"{len(candidates):,} of {len(words):,} {vocab} vocab words are single tokens",
        err=True,
    )
    settings = EvalSettings(method=method, split=split, vocab=vocab, batch_size=batch_size)
    name = f"discrete-{_slug(prompts_file.stem)}" if prompts_file is not None else method
    out = out or Path("runs") / f"{name}-{_slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"
    if control != "none":
        extra["seed"] = seed
    run = RunFolder(out, run_config(backend, lama, settings, candidates, **extra), resume=resume)
    try:
        results = evaluate_relations(backend, lama, ids, candidates, run, settings, chosen)
    except KeyboardInterrupt:
        _interrupted(run)
    _print_results(results)
    typer.echo(f"\nsaved {run.root}/results.json, relations.csv, summary.md ({time.time() - t0:.1f}s in all)")


def _eval_prompts(run_dir: Path, model: str | None, data: str | None, batch_size: int, device: str) -> None:
    """Reload the prompts of a training run and re-evaluate them on its test split."""
    import pandas as pd

    from probe.backends import load_backend
    from probe.data import LamaData
    from probe.pipeline import reevaluate_run
    from probe.runs import read_json
    from probe.vocab import build_candidates

    cfg = read_json(run_dir / "config.json")
    if cfg.get("command") != "train":
        raise ProbeError(f"{run_dir} is not a training run folder (its config.json says command {cfg.get('command')!r})")
    if model is not None and model != cfg["model"]:
        raise ProbeError(f"run folder {run_dir} was trained on model {cfg['model']!r}, not {model!r}")
    lama = LamaData(data or cfg["data"])
    backend = load_backend(cfg["model"], device=device, dtype=cfg.get("dtype", "float32"),
                           control=cfg.get("control", "none"), seed=cfg.get("seed") or 0)
    if backend.kind != cfg["model_kind"]:
        raise ProbeError(f"run folder {run_dir} was trained on a {cfg['model_kind']} LM, {cfg['model']!r} is {backend.kind}")
    candidates = build_candidates(backend.tokenizer, lama.vocab_words(cfg["vocab"]))
    rows = reevaluate_run(backend, lama, run_dir, candidates, batch_size)
    df = pd.DataFrame(rows)[["relation", "type", "n_facts", "saved_p1", "p1", "saved_p10", "p10", "saved_mrr", "mrr"]]
    df["same"] = [all(r[k] == r[f"saved_{k}"] for k in ("p1", "p10", "mrr")) for r in rows]
    typer.echo(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    same = int(df["same"].sum())
    typer.echo(f"\n{same} of {len(df)} relations reproduce the saved test figures exactly")
    if same != len(df):
        raise typer.Exit(1)


@app.command("train")
def train_cmd(
    model: ModelOpt = "smollm2",
    method: Annotated[str, typer.Option(
        help="ptuning, ptuning-mlp, prompt-tuning, prefix-tuning or autoprompt.")] = "ptuning",
    relation: Annotated[list[str] | None, typer.Option("--relation", "-r", help="Relation id, e.g. P19.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Train every T-REx relation.")] = False,
    template: Annotated[str | None, typer.Option(
        help="Template file (see templates/) or inline shape; default (3,sub,3,obj,3) masked, (3,sub,3,obj) causal "
             "((6,sub,obj) for prefix-tuning).")] = None,
    init: Annotated[str | None, typer.Option(
        help="prompt-tuning and prefix-tuning: random, vocab or template (default vocab); autoprompt: neutral or "
             "manual (start the search from the manual prompt's words; default neutral).")] = None,
    reparam: Annotated[str | None, typer.Option(
        help="prefix-tuning: mlp (train an MLP over a small embedding, folded away at save) or none.")] = None,
    split: Annotated[str, typer.Option(help="Test split: test_34k (alias test) or test_29k.")] = "test_34k",
    vocab: Annotated[str, typer.Option(help="Candidate vocabulary: common or 29k.")] = "common",
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<method>-<model>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a run folder, skipping finished relations.")] = False,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate (default: the method's, chosen on dev: 1e-3, or 1e-2 for prompt-tuning).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the train facts.")] = 2,
    min_steps: Annotated[int, typer.Option(help="At least this many steps: small relations get more passes.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Train facts per step.")] = 16,
    eval_every: Annotated[int, typer.Option(help="Steps between dev evaluations.")] = 25,
    patience: Annotated[int, typer.Option(help="Dev evaluations without gain before stopping.")] = 4,
    max_train: Annotated[int, typer.Option(help="Use at most this many train facts (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 13,
    iterations: Annotated[int, typer.Option(help="autoprompt: search iterations (one trigger slot each).")] = 30,
    top_k: Annotated[int, typer.Option(help="autoprompt: candidate tokens re-scored per iteration.")] = 10,
    capitals: Annotated[bool, typer.Option(help="autoprompt: allow capitalised trigger tokens.")] = True,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "bfloat16",
    control: ControlOpt = "none",
) -> None:
    """Train a prompt per relation against the frozen LM, then test it next to the manual prompt."""
    from probe.autoprompt import AutoPromptConfig
    from probe.backends import load_backend
    from probe.data import SPLIT_ALIASES, LamaData
    from probe.methods import get_method, method_config
    from probe.pipeline import EvalSettings, load_template_spec, relation_facts, run_config, train_relations
    from probe.runs import RunFolder
    from probe.train import TrainConfig
    from probe.vocab import build_candidates

    t0 = time.time()
    _positive(batch_size=batch_size, epochs=epochs, eval_every=eval_every, patience=patience, iterations=iterations,
              top_k=top_k)
    method_cls = get_method(method)
    config_of_method = method_config(method, init=init, reparam=reparam)
    load_template_spec(template)  # a bad template fails before the model loads
    if method == "autoprompt" and init == "manual" and template is not None:
        raise ProbeError("--init manual builds each relation's template from its manual prompt: drop --template")
    lama = LamaData(data)
    ids = _relation_ids(lama, relation, all_)
    split = SPLIT_ALIASES.get(split, split)
    if split not in ("test_34k", "test_29k"):
        raise ProbeError(f"--split {split!r}: a trained prompt is tested on test_34k or test_29k, never on train or dev")
    if not method_cls.trainable:
        raise ProbeError(f"method {method!r} has nothing to train: use `probe eval --method {method}`")
    words = lama.vocab_words(vocab)
    backend = load_backend(model, device=device, dtype=dtype, control=control, seed=seed)
    candidates = build_candidates(backend.tokenizer, words)
    if len(ids) == 1:
        rel = lama.relation(ids[0])
        if not relation_facts(lama, rel, "train", candidates, strict=False)[0]:
            raise ProbeError(f"relation {rel.id} has no train facts left after filtering by the candidate vocabulary")
        relation_facts(lama, rel, split, candidates, strict=True)
    typer.echo(f"{model} ({backend.kind} LM, {backend.dtype}) loaded in {time.time() - t0:.1f}s; "
               f"{len(candidates):,} candidates", err=True)
    if method == "autoprompt":  # a discrete search: its own settings
        train_config = AutoPromptConfig(iterations=iterations, top_k=top_k, batch_size=batch_size, capitals=capitals,
                                        seed=seed)
    else:
        train_config = TrainConfig(lr=lr or method_cls.default_lr, batch_size=batch_size, epochs=epochs,
                                   min_steps=min_steps, eval_every=eval_every, patience=patience, max_train=max_train, seed=seed)
    settings = EvalSettings(method=method, split=split, vocab=vocab)
    config = run_config(backend, lama, settings, candidates, command="train", template_file=template, seed=seed,
                        method_config=config_of_method.__dict__, train=train_config.__dict__)
    out = out or Path("runs") / f"{method}-{_slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunFolder(out, config, resume=resume)
    try:
        results = train_relations(backend, lama, ids, candidates, run, method, config_of_method, train_config,
                                  template, settings)
    except KeyboardInterrupt:
        _interrupted(run)
    _print_results(results)
    typer.echo(f"\nsaved {run.root} ({time.time() - t0:.0f}s in all)")


@app.command("compare")
def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run folders, or folders holding run folders.")],
    out: Annotated[Path | None, typer.Option(help="Where to save compare.csv, compare.md and the plots "
                                                  "(default runs/compare-<time>).")] = None,
    allow_mixed: Annotated[bool, typer.Option(help="Compare runs of different models, vocabularies or splits.")] = False,
) -> None:
    """One table of methods against relations (P@1), macro/micro on the shared relations, gain over manual, plots."""
    import pandas as pd

    from probe.compare import compare_runs, load_runs, write_comparison

    cmp = compare_runs(load_runs(runs), allow_mixed=allow_mixed)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_columns", None):
        typer.echo(cmp.per_relation.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        typer.echo("")
        typer.echo(cmp.summary.drop(columns=["model"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo("\n".join(cmp.notes))
    out = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    written = write_comparison(cmp, out)
    typer.echo(f"saved {', '.join(str(p) for p in written)}")


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
    from probe.backends import load_backend
    from probe.data import LamaData
    from probe.explain import INPUT_SPACE, check_explainable, explain_vectors, load_vectors, vocabulary_table
    from probe.runs import atomic_write_json, read_json

    _positive(k=k)
    if not (run_dir / "config.json").is_file():
        raise ProbeError(f"{run_dir} is not a run folder (expected {run_dir / 'config.json'})")
    cfg = read_json(run_dir / "config.json")
    check_explainable(cfg, run_dir)
    lama = LamaData(data or cfg["data"])
    folders = sorted((p.parent for p in run_dir.glob("P*/prompt.safetensors")), key=lambda p: int(p.name[1:]))
    if relation:
        folders = [f for f in folders if f.name in relation]
    if not folders:
        raise ProbeError(f"{run_dir} holds no saved prompts{' for ' + ', '.join(relation) if relation else ''}")
    backend = load_backend(cfg["model"], dtype="float32")
    tables = {}
    report = {}
    for folder in folders:
        rel = lama.relation(folder.name)
        gold = {f.obj for split in ("train", "dev") for f in lama.facts(rel.id, split)}
        words = set(rel.template.replace("[X]", " ").replace("[Y]", " ").split())
        vectors, space = load_vectors(folder)
        if space not in tables:
            tables[space] = vocabulary_table(backend, space)
            if space != INPUT_SPACE:
                typer.echo(f"note: {cfg.get('method')} learns no input vectors; comparing the {space} of each virtual "
                           "token with those of every vocabulary token on its own")
        info = {"space": space, **explain_vectors(backend.tokenizer, tables[space], vectors, k, gold, words)}
        report[rel.id] = info
        typer.echo(f"{rel.id} {rel.label} (manual: {rel.template})")
        for slot in info["slots"]:
            shown = ", ".join(f"{t} {s:.2f}" for t, s in zip(slot["tokens"], slot["similarity"], strict=True))
            typer.echo(f"  v{slot['slot']}: {shown}")
        typer.echo(f"  {info['slots_sharing_nearest']} of {len(info['slots'])} virtual tokens share their nearest token; "
                   f"{info['distinct_neighbours']} distinct neighbours; gold objects among them: "
                   f"{', '.join(info['gold_neighbours']) or 'none'}; template words: "
                   f"{', '.join(info['template_neighbours']) or 'none'}")
    atomic_write_json(run_dir / "explain.json", {"k": k, "relations": report})
    typer.echo(f"saved {run_dir / 'explain.json'}")


@templates_app.command("check")
def templates_check(file: Path) -> None:
    """Validate a template file; print its entries."""
    from probe.templates import WORDS, parse_template_file

    tf = parse_template_file(file)
    for key, t in tf.entries.items():
        slots = sum(p.kind == WORDS for p in t.parts)
        typer.echo(f"{key}: {t.source}  ({t.n_virtual} virtual tokens" + (f", {slots} word slots)" if slots else ")"))
    typer.echo(f"{file}: {len(tf.entries)} templates, all valid")


@templates_app.command("show")
def templates_show(
    file: Annotated[str, typer.Argument(help="Template file or inline template.")],
    model: ModelOpt = "smollm2",
    relation: Annotated[str, typer.Option("--relation", "-r")] = "P19",
    data: DataOpt = None,
) -> None:
    """Print what the model sees for a relation's first test fact; virtual tokens as [V1]..[Vn]."""
    from probe.backends import load_backend
    from probe.data import LamaData
    from probe.pipeline import load_template_spec
    from probe.templates import compile_template

    tf = load_template_spec(str(file))
    lama = LamaData(data)
    rel = lama.relation(relation)
    backend = load_backend(model)
    template = tf.template_for(rel.id, backend.kind)
    compiled = compile_template(template, backend.tokenizer, backend.kind, manual=rel.template)
    facts = lama.facts(rel.id, "test_34k")
    sub = facts[0].sub if facts else "[X]"
    typer.echo(f"{rel.id} ({rel.label}), {backend.kind} LM: {template.source}")
    typer.echo(compiled.describe(sub))


@app.command("sweep")
def sweep_cmd(
    grid: Annotated[Path, typer.Argument(help="A sweep grid file (TOML; see sweeps/).")],
    out: Annotated[Path | None, typer.Option(help="Sweep folder (default runs/sweep-<grid name>); "
                                                  "rerunning into it skips finished cells.")] = None,
    data: DataOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Train every cell of a grid (method x length x init x reparam x seed x relation); tables of mean ± std over seeds."""
    from probe.backends import load_backend
    from probe.data import LamaData
    from probe.pipeline import load_template_spec
    from probe.sweep import cells_of, load_grid, prepare_folder, run_sweep, write_tables
    from probe.vocab import build_candidates

    t0 = time.time()
    spec = load_grid(grid)
    lama = LamaData(data)
    ids = list(lama.relations) if spec.relations == "all" else [lama.relation(r).id for r in spec.relations]
    load_template_spec(spec.template)  # a bad template fails before the model loads
    out = out or Path("runs") / f"sweep-{grid.stem}"
    words = lama.vocab_words(spec.vocab)
    prepare_folder(out, spec, {"data": str(lama.root.resolve())})
    backend = load_backend(spec.model, device=device, dtype=spec.dtype, control=spec.control)
    candidates = build_candidates(backend.tokenizer, words)
    n = len(cells_of(spec, ids))
    typer.echo(f"{spec.model} loaded in {time.time() - t0:.1f}s; {n} cells ({n // len(ids)} settings x {len(ids)} "
               f"relations)", err=True)
    try:
        run_sweep(backend, lama, spec, ids, candidates, out)
    except KeyboardInterrupt:
        write_tables(out, cells_of(spec, ids))
        typer.echo(f"interrupted: finished cells are saved in {out}; rerun the same command to continue", err=True)
        raise typer.Exit(130) from None
    summary = out / "summary.md"
    if summary.exists():
        typer.echo(summary.read_text(encoding="utf-8"))
    typer.echo(f"saved {out} ({time.time() - t0:.0f}s in all)")


def _slug(model: str) -> str:
    name = Path(model).name if ("/" in model or model.endswith(".gguf")) else model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.removesuffix(".gguf")) or "model"


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C exits 130."""
    try:
        app()
    except ProbeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
