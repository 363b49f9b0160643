"""`probe eval --prompts-file DIR --consistency`: every pattern of each relation (ParaRel's paraphrases) on the same
facts and candidates, and ParaRel's consistency figures (probe/consistency.py); with `--prompts RUN`, a trained
prompt as one more node."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from probe.cells import CellOutput, LoadedModel, torch_threads
from probe.commands.common import RunResult, execute, facts_in_context, open_model, relation_row, run_folder_for
from probe.commands.eval import RelationCell
from probe.commands.rerun import check_recorded_model
from probe.consistency import (
    PARAREL_FACTS,
    PARAREL_SPLIT,
    Edge,
    consistency_metrics,
    default_graphs,
    macro,
    prompt_metrics,
    read_fact_rows,
    relation_graph,
)
from probe.controls import get_control
from probe.data import Fact, FactData
from probe.errors import DataError, ModelError, RunFolderError, SettingError, TemplateError, check_positive
from probe.evaluator import evaluate_facts
from probe.files import atomic_write_json, atomic_write_text, read_json
from probe.objects import ObjectsSpec, object_candidates
from probe.options import Options, check_new_folder, load_data, make_executor, model_names, relation_ids, reopen_data
from probe.prompt_files import read_prompts
from probe.runs import RunConfig, markdown_table
from probe.saved_prompts import load_prompt, saved_relations
from probe.templates import compile_template
from probe.vocab import CandidateChoice, build_candidates

CONSISTENCY_FLAGS = {"model", "relation", "all", "split", "data", "facts", "fields", "out", "resume", "batch_size",
                     "device", "dtype", "threads", "jobs", "ray", "cpus_per_worker", "max_memory", "objects",
                     "length_norm", "prompts_file", "prompts", "allow_download"}
TABLE = ["relation", "n_facts", "n_patterns", "n_pairs", "consistency", "syntactic_consistency", "lexical_consistency",
         "both_consistency", "lama_acc", "group_acc", "consistent_subjects", "knowledgeable_consistency",
         "unknowledgeable_consistency"]
PROMPT_TABLE = ["prompt_acc", "prompt_agreement", "prompt_majority_agreement_consistent",
                "prompt_majority_agreement_inconsistent"]


@dataclass
class SavedPrompt:
    """A relation's trained prompt from a `probe train` run: its folder, template, manual words and fit threads."""

    folder: str
    template: str
    manual: str | None
    threads: int | None


@dataclass
class ConsistencyCell(RelationCell):
    """One relation: every pattern (and a trained prompt, if given) ranks the relation's objects for the same facts."""

    split: str = "test"
    patterns: list[str] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    facts_file: str | None = None  # ParaRel's facts file (every row kept); None: the data's split
    any_length: bool = False
    length_norm: bool = False
    batch_size: int = 128
    prompt: SavedPrompt | None = None

    def rows(self, data: FactData) -> list[Fact]:
        return read_fact_rows(Path(self.facts_file)) if self.facts_file else data.facts(self.key, self.split)

    def run(self, loaded: LoadedModel) -> CellOutput:
        backend, relation = loaded.backend, loaded.data.relation(self.key)
        rows = self.rows(loaded.data)
        objects = list(dict.fromkeys(f.obj for f in rows))
        candidates = (object_candidates(backend.tokenizer, objects, self.length_norm, f"relation {self.key}")
                      if self.any_length else build_candidates(backend.tokenizer, objects))
        kept = [f for f in rows if f.obj in candidates.index]
        dropped, warnings, compiled, skipped = len(rows) - len(kept), [], {}, {}
        for p in self.patterns:
            try:
                compiled[p] = compile_template(p, backend.tokenizer, backend.kind)
            except TemplateError as e:
                skipped[p] = str(e)
        if self.patterns[0] in skipped:
            warnings.append(f"{self.key}: the first pattern {self.patterns[0]!r} cannot be asked of a {backend.kind} LM, "
                            "so lama_acc is the first pattern that can")
        nodes = [p for p in self.patterns if p in compiled]
        prompt = compiled_prompt = None
        if self.prompt is not None:
            compiled_prompt = compile_template(self.prompt.template, backend.tokenizer, backend.kind,
                                               manual=self.prompt.manual or relation.template)
            prompt = load_prompt(Path(self.prompt.folder) / "prompt.safetensors").to(backend.device)
        for template in [*compiled.values(), *([compiled_prompt] if compiled_prompt else [])]:
            kept, long = facts_in_context(loaded, relation, template, kept, candidates, warnings)
            dropped += long
        if len(nodes) < 1 or not kept:
            why = "no pattern can be asked of this model" if not nodes else f"no {self.split} facts left after filtering"
            return CellOutput(warnings=[*warnings, f"{self.key}: {why}; skipped"])
        top1: dict[str, dict[str, str]] = {}
        first = None
        with tqdm(total=len(kept) * (len(nodes) + bool(prompt)), unit="fact", desc=self.key, leave=False,
                  dynamic_ncols=True) as bar:
            for p in nodes:
                result = evaluate_facts(backend, None, compiled[p], kept, candidates, self.batch_size, bar)
                top1[p] = {f.sub: t[0] for f, t in zip(result.facts, result.top10, strict=True)}
                first = first or result
            if prompt is not None:
                threads = self.prompt.threads if backend.device.type == "cpu" else None
                with torch_threads(threads):
                    result = evaluate_facts(backend, prompt, compiled_prompt, kept, candidates, self.batch_size, bar)
                prompt_top1 = {f.sub: t[0] for f, t in zip(result.facts, result.top10, strict=True)}
        node_set = set(nodes)
        edges = [e for e in self.edges if e.source in node_set and e.target in node_set]
        metrics = {**relation_row(relation), "n_facts": len(kept), "n_dropped": dropped, "n_candidates": len(candidates),
                   **({"dropped_reason": candidates.dropped_reason} if dropped else {}), "template": nodes[0],
                   **first.metrics, **consistency_metrics(nodes, edges, kept, top1),
                   "patterns_skipped": skipped}
        if prompt is not None:
            metrics.update(prompt_template=self.prompt.template, **prompt_metrics(nodes, kept, top1, prompt_top1))
        predictions = [{"sub": s, "obj": f.obj, "answers": {p: top1[p][s] for p in nodes},
                        **({"prompt": prompt_top1[s]} if prompt is not None else {})}
                       for s, f in {f.sub: f for f in kept}.items()]
        files = [(f"{self.key}/predictions.jsonl",
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions).encode()),
                 (f"{self.key}/metrics.json", (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode())]
        return CellOutput(files, warnings=warnings)


def consistency_split(data: FactData, split: str | None) -> tuple[str, Path | None]:
    """The facts asked: ParaRel's own (`pararel`, the default where a LAMA folder holds them), or a split of the data."""
    folder = data.vocab_root() / PARAREL_FACTS if data.kind == "lama" else None
    if split == PARAREL_SPLIT or (split is None and folder is not None and folder.is_dir()):
        if folder is None or not folder.is_dir():
            raise DataError(f"--split {PARAREL_SPLIT}: ParaRel's facts are read from a LAMA folder's {PARAREL_FACTS}, "
                            f"not found in {data.name}")
        return PARAREL_SPLIT, folder
    return data.split_name(split), None


def _saved_prompts(run_dir: Path, model: list[str] | None, allow_download: bool = False) -> tuple[dict, dict[str, SavedPrompt]]:
    """A training run's config and its saved prompts by relation."""
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    cfg = read_json(run_dir / "config.json")
    if cfg.get("command") != "train":
        raise RunFolderError(f"{run_dir} is not a training run folder (its config.json says command {cfg.get('command')!r})")
    if model and list(dict.fromkeys(model)) != [cfg["model"]]:
        raise ModelError(f"run folder {run_dir} was trained on model {cfg['model']!r}, not {model[0]!r}")
    check_recorded_model(run_dir, cfg, bool(model), allow_download)
    saved = {}
    for rid in saved_relations(run_dir):
        rel = read_json(run_dir / rid / "config.json")
        saved[rid] = SavedPrompt(str((run_dir / rid).resolve()), rel["template"], rel.get("manual_template"),
                                 rel.get("torch_threads"))
    if not saved:
        raise RunFolderError(f"{run_dir} holds no saved prompts (expected RELATION/prompt.safetensors)")
    return cfg, saved


def run_consistency(opts: Options, log=print) -> list[RunResult]:
    """Every pattern of the prompts folder on each relation's facts, ranking the relation's objects; ParaRel's figures
    per relation and macro. Every check runs before a folder is made or a model loaded."""
    t0 = time.time()
    opts.refuse(CONSISTENCY_FLAGS, "--consistency (candidates: each relation's objects; use --objects any for "
                                   "objects of any length)")
    batch_size = 128 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    objects = opts.objects or "single"
    if objects not in ("single", "any"):
        raise SettingError(f"--objects {objects!r}: expected single (one-token objects) or any")
    if opts.length_norm and objects != "any":
        raise SettingError("--length-norm applies to --objects any")
    cfg, saved = (None, {})
    if opts.prompts is not None:
        cfg, saved = _saved_prompts(Path(opts.prompts), opts.model, bool(opts.allow_download))
        if opts.dtype is not None:
            raise SettingError("--dtype does not apply to --prompts (the run's own dtype is used)")
    data = reopen_data(cfg, opts.data) if cfg else load_data(opts)
    if opts.prompts_file is None:
        default = data.vocab_root() / "prompts" / "pararel"
        if data.kind != "lama" or not default.is_dir():
            raise SettingError("--consistency needs --prompts-file: a folder of each relation's patterns (ParaRel's)")
        opts.prompts_file = default
    prompt_set = read_prompts(opts.prompts_file)
    prompt_set.check_relations(data.relations)
    graphs = default_graphs(Path(opts.prompts_file))
    if not graphs.is_dir():
        raise DataError(f"--consistency reads each relation's graph from {graphs} (JSONL edges), which is not a folder")
    ids = relation_ids(data, opts.relation, opts.all) if (opts.relation or opts.all or not saved) else list(saved)
    chosen = prompt_set.chosen(ids, 0, strict=bool(opts.relation))
    if saved:
        missing = [r for r in chosen if r not in saved]
        if missing and opts.relation:
            raise RunFolderError(f"{opts.prompts} has no saved prompt for {', '.join(missing)}")
        chosen = {r: p for r, p in chosen.items() if r in saved}
    if not chosen:
        raise TemplateError(f"prompts file {opts.prompts_file} has no patterns for the relations asked for")
    if len(chosen) < len(ids):
        log(f"warning: no patterns{' or saved prompt' if saved else ''} for "
            f"{', '.join(r for r in ids if r not in chosen)}; skipped")
    patterns = {rid: [p.template for p in ps] for rid, ps in chosen.items()}
    edges = {rid: relation_graph(graphs, rid, pats) for rid, pats in patterns.items()}
    split, facts_dir = consistency_split(data, opts.split)
    names = [cfg["model"]] if cfg else model_names(opts, several=False)
    check_new_folder(opts.out, opts.resume)
    choice = CandidateChoice("objects", ObjectsSpec())  # built lazily; each cell builds its relation's objects
    executor = make_executor(data, choice, opts.ray, opts.cpus_per_worker, opts.threads, log, opts.jobs)
    try:
        device = opts.device or (("auto" if str(cfg.get("device", "cpu")).startswith("cuda") else "cpu") if cfg else None)
        spec, info = open_model(names[0], device, cfg["dtype"] if cfg else opts.dtype, executor, get_control("none"),
                                max_memory=opts.max_memory)
        config = RunConfig.of(
            "eval", info, data, n_candidates=0, n_vocab_words=0, method="consistency", split=split,
            vocab="relation objects", batch_size=batch_size, template_file=str(Path(opts.prompts_file).resolve()),
            device=spec.device, torch_threads=executor.threads,
            method_config={"graphs": str(graphs.resolve()), "objects": objects, "length_norm": bool(opts.length_norm),
                           "trained_prompts": str(Path(opts.prompts).resolve()) if saved else None},
            prompts={"prompts_format": prompt_set.format, "prompts_per_relation": {r: len(p) for r, p in patterns.items()}},
        )
        run = run_folder_for(opts.out, "consistency", info.name, False, config.to_dict(), bool(opts.resume))
        no_facts = [rid for rid in patterns if facts_dir and not (facts_dir / f"{rid}.jsonl").is_file()]
        if no_facts:
            log(f"warning: no ParaRel facts in {facts_dir} for {', '.join(no_facts)}; skipped")
        cells = [ConsistencyCell(rid, spec, run.root, split, patterns[rid], edges[rid],
                                 str(facts_dir / f"{rid}.jsonl") if facts_dir else None, objects == "any",
                                 bool(opts.length_norm), batch_size, saved.get(rid))
                 for rid in patterns if rid not in no_facts]
    except BaseException:
        executor.close()
        raise
    results = execute(executor, [run], cells, "consistency", log)[0]
    results["consistency"] = macro(results["relations"])
    atomic_write_json(run.root / "results.json", results)
    atomic_write_text(run.root / "consistency.md", consistency_markdown(results))
    from probe.plots import plot_consistency

    plot_consistency(results["relations"], run.root / "consistency.png")
    return [RunResult(run, results, time.time() - t0)]


def consistency_tables(results: dict):
    """Per relation and macro tables of the consistency figures (pandas DataFrames)."""
    import pandas as pd

    rows = results["relations"]
    columns = TABLE + [c for c in PROMPT_TABLE if any(c in r for r in rows)]
    per = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    summary = results.get("consistency") or macro(rows)
    mac = pd.DataFrame([{c: summary.get(c) for c in columns[4:]}])
    mac.insert(0, "relations", len(rows))
    return per, mac


def consistency_markdown(results: dict) -> str:
    per, mac = consistency_tables(results)
    cfg = results["config"]
    return (f"# ParaRel consistency of {cfg['model']} ({cfg['split']} facts)\n\nFigures in percent; macro = mean over "
            "the relations where a figure is defined.\n\n" + markdown_table(mac) + "\n\n" + markdown_table(per) + "\n")
