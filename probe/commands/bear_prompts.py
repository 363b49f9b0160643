"""`probe eval --prompts RUN --data BEAR`: prompts trained on LAMA T-REx, evaluated on BEAR's facts of the same
relation id against BEAR's answer space, next to the manual templates of both benchmarks.

Per shared relation: the trained prompt (its template's real words from the run) ranks BEAR's answers by their
log-likelihood after the prompt (object scoring, as `--objects any`); so does LAMA's manual template, on the same
facts and answers. For reference, LAMA's manual template and BEAR's own templates are also scored as BEAR scores
them (whole statements, `--score statement`). Relations only one side has are listed and skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from probe.backends import load_backend
from probe.commands.common import RunResult, default_out
from probe.commands.rerun import check_recorded_model
from probe.data import open_data
from probe.errors import DataError, RunFolderError, SettingError, check_positive
from probe.evaluator import evaluate_facts
from probe.files import atomic_write_json, atomic_write_text, read_json
from probe.objects import object_candidates
from probe.options import Options, check_new_folder, check_threads, reopen_data
from probe.plots import plot_manual_scatter
from probe.runs import RunFolder, markdown_table
from probe.saved_prompts import load_prompt, saved_relations
from probe.statements import gold_ranks, statement_scores
from probe.templates import compile_template

BEAR_PROMPT_FLAGS = {"prompts", "data", "relation", "out", "resume", "batch_size", "device", "threads", "reduction",
                     "allow_download"}


def run_prompts_on_bear(opts: Options, log=print) -> list[RunResult]:
    """Every check first (flags, the run folder, the relations), then one row per relation both sides have."""
    t0 = time.time()
    opts.refuse(BEAR_PROMPT_FLAGS, "`probe eval --prompts RUN --data BEAR` (the run's model, dtype and prompts on "
                                   "BEAR's facts and answers)")
    batch_size = 64 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    check_threads(opts.threads)
    reduction = opts.reduction or "sum"
    if reduction not in ("sum", "mean"):
        raise SettingError(f"--reduction {reduction!r}: expected sum (LM Pub Quiz's default) or mean")
    run_dir = Path(opts.prompts)
    if not (run_dir / "config.json").is_file():
        raise RunFolderError(f"run folder {run_dir} does not exist (expected a `probe train` folder with config.json)")
    cfg = read_json(run_dir / "config.json")
    if cfg.get("command") != "train":
        raise RunFolderError(f"{run_dir} is not a training run folder (its config.json says command {cfg.get('command')!r})")
    check_recorded_model(run_dir, cfg, False, bool(opts.allow_download))
    bear = open_data(opts.data)
    saved = saved_relations(run_dir)
    if not saved:
        raise RunFolderError(f"{run_dir} holds no saved prompts (expected RELATION/prompt.safetensors)")
    asked = [r.strip() for given in opts.relation or [] for r in given.split(",") if r.strip()]
    unknown = [r for r in asked if r not in saved or r not in bear.relations]
    if unknown:
        raise DataError(f"relation {unknown[0]!r} is not in both {run_dir} and {bear.name} (shared: "
                        f"{', '.join(r for r in saved if r in bear.relations) or 'none'})")
    shared = [r for r in saved if r in bear.relations and (not asked or r in asked)]
    only_run = [r for r in saved if r not in bear.relations]
    only_bear = [r for r in bear.relations if r not in saved]
    if not shared:
        raise DataError(f"{run_dir} and {bear.name} share no relation")
    out = Path(opts.out) if opts.out else default_out("bear-prompts", cfg["model"])
    check_new_folder(out, opts.resume)
    lama = reopen_data(cfg)
    config = {"command": "eval", "model": cfg["model"], "model_kind": cfg["model_kind"], "method": cfg.get("method"),
              "prompts_run": str(run_dir.resolve()), "data": bear.name, "split": "test", "vocab": "answers",
              "dtype": cfg.get("dtype"), "score": "object", "statement_reduction": reduction,
              "skipped": {"only_in_run": only_run, "only_in_data": only_bear}}
    run = RunFolder(out, config, resume=bool(opts.resume))
    log(f"{len(shared)} relation(s) in both; skipped, only in the run: {', '.join(only_run) or 'none'}; "
        f"only in {bear.name}: {', '.join(only_bear) or 'none'}")
    recorded = str(cfg.get("device", "cpu"))
    backend = load_backend(cfg["model"], device=opts.device or ("auto" if recorded.startswith("cuda") else "cpu"),
                           dtype=cfg.get("dtype", "float32"), control=cfg.get("control", "none"), seed=cfg.get("seed") or 0)
    if opts.threads and backend.device.type == "cpu":
        torch.set_num_threads(opts.threads)
    run.create()
    try:
        for rid in tqdm(shared, desc="bear", unit="relation", dynamic_ncols=True):
            if run.is_done(rid):
                continue
            row = relation_row_on_bear(backend, bear, lama, run_dir / rid, rid, batch_size, reduction)
            atomic_write_json(run.relation_dir(rid) / "metrics.json", row)
    except BaseException:
        run.abandon()
        raise
    results = run.write_summary()
    results["bear"] = write_bear_prompt_report(run.root, results["relations"])
    return [RunResult(run, results, time.time() - t0)]


def relation_row_on_bear(backend, bear, lama, folder: Path, rid: str, batch_size: int, reduction: str) -> dict:
    """One relation: the trained prompt and LAMA's manual template ranking BEAR's answers (object scoring), and
    statement accuracy of LAMA's manual template and of each BEAR template."""
    rel_cfg = read_json(folder / "config.json")
    relation = bear.relation(rid)
    manual = rel_cfg.get("manual_template") or lama.relation(rid).template
    facts = bear.facts(rid)
    answers = list(relation.answers)
    candidates = object_candidates(backend.tokenizer, answers, where=f"BEAR relation {rid}")
    facts = [f for f in facts if f.obj in candidates.index]
    compiled = compile_template(rel_cfg["template"], backend.tokenizer, backend.kind, manual=manual)
    prompt = load_prompt(folder / "prompt.safetensors").to(backend.device)
    if prompt.n_virtual != compiled.n_virtual:
        raise RunFolderError(f"{folder}: {prompt.n_virtual} saved vectors for {compiled.n_virtual} virtual slots")
    trained = evaluate_facts(backend, prompt, compiled, facts, candidates, batch_size).metrics
    by_manual = evaluate_facts(backend, None, compile_template(manual, backend.tokenizer, backend.kind), facts,
                               candidates, batch_size).metrics
    gold = torch.tensor([answers.index(f.obj) for f in facts])
    subjects = [f.sub for f in facts]

    def accuracy(template: str) -> float:
        scores = statement_scores(backend, template, subjects, answers, reduction, batch_size)
        return 100 * (gold_ranks(scores, gold) == 1).double().mean().item()

    bear_by_template = [accuracy(t) for t in relation.templates]
    lama_type = lama.relations[rid].type if rid in lama.relations else ""
    return {"relation": rid, "label": lama.relations[rid].label if rid in lama.relations else "", "type": lama_type,
            "n_facts": len(facts), "n_dropped": len(bear.facts(rid)) - len(facts), "n_candidates": len(candidates),
            "template": rel_cfg["template"], "lama_template": manual, "bear_templates": list(relation.templates),
            "domains": list(relation.domains),
            **{k: trained[k] for k in ("p1", "p10", "mrr")}, **{f"manual_{k}": by_manual[k] for k in ("p1", "p10", "mrr")},
            "manual_statement_p1": accuracy(manual), "bear_p1": sum(bear_by_template) / len(bear_by_template),
            "bear_p1_by_template": bear_by_template}


def write_bear_prompt_report(root: Path, rows: list[dict]) -> dict:
    """bear.md (a row per relation, then the macro means) and bear_vs_manual.png (per relation: the trained prompt's
    and BEAR's templates' accuracy against LAMA's manual template's)."""
    import pandas as pd

    columns = {"p1": "trained (object)", "manual_p1": "LAMA manual (object)",
               "manual_statement_p1": "LAMA manual (statement)", "bear_p1": "BEAR templates (statement, mean)"}
    table = pd.DataFrame([{"relation": r["relation"], "instances": r["n_facts"], "answers": r["n_candidates"],
                           **{label: r[k] for k, label in columns.items()}} for r in rows])
    macro = {label: sum(r[k] for r in rows) / len(rows) for k, label in columns.items()} if rows else {}
    text = ("# Trained prompts on BEAR (accuracy = P@1 in %, BEAR's facts and answer space)\n\n"
            "object: answers ranked by their log-likelihood after the prompt; statement: by the whole filled "
            "template's (LM Pub Quiz's protocol)\n\n"
            + (f"Macro over {len(rows)} relations: " + "; ".join(f"{k} {v:.2f}" for k, v in macro.items()) + "\n\n"
               if rows else "") + markdown_table(table) + "\n")
    atomic_write_text(root / "bear.md", text)
    xs = [r["manual_p1"] for r in rows]
    plot_manual_scatter({"trained prompt (object)": (xs, [r["p1"] for r in rows]),
                         "BEAR templates (statement)": (xs, [r["bear_p1"] for r in rows])},
                        root / "bear_vs_manual.png")
    return {"relations": len(rows), "macro": macro}
