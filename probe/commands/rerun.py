"""`probe eval --prompts RUN`: re-evaluate a training run's saved prompts on its own split, vocabulary, model and
dtype, with the CPU threads each fit had, so that the test figures reproduce."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from probe.backends import Backend, load_backend
from probe.backends.loading import is_hub_id
from probe.batching import relation_facts
from probe.cells import torch_threads
from probe.data import FactData
from probe.errors import ModelError, RunFolderError, check_positive
from probe.evaluator import evaluate_facts
from probe.files import read_json
from probe.objects import ObjectsSpec
from probe.options import Options, check_threads, model_names, relation_ids, reopen_data
from probe.saved_prompts import load_prompt, saved_relations
from probe.templates import compile_template
from probe.vocab import CandidateChoice

RERUN_FLAGS = {"prompts", "relation", "all", "data", "batch_size", "device", "model", "threads",
               "allow_download"}  # --data: the data moved


def rerun_prompts(opts: Options, log=print) -> list[dict]:
    """`probe eval --prompts RUN`: re-evaluate a training run's saved prompts on its own split, vocabulary, model
    and dtype; rows carry the saved and the recomputed metrics."""
    opts.refuse(RERUN_FLAGS, "`probe eval --prompts` (it re-evaluates the run's own split, vocabulary, model and dtype)")
    batch_size = 128 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    check_threads(opts.threads)
    run_dir = Path(opts.prompts)
    if not run_dir.exists():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    cfg = read_json(run_dir / "config.json")
    if cfg.get("command") != "train":
        raise RunFolderError(f"{run_dir} is not a training run folder (its config.json says command {cfg.get('command')!r})")
    if opts.model and model_names(opts, several=False) != [cfg["model"]]:
        raise ModelError(f"run folder {run_dir} was trained on model {cfg['model']!r}, not {opts.model[0]!r}")
    check_recorded_model(run_dir, cfg, bool(opts.model), bool(opts.allow_download))
    spec = cfg.get("data_spec") or {"data": cfg.get("data")}
    log(f"{run_dir} records model {cfg['model']!r}, data {opts.data or spec.get('facts') or spec.get('data')}, "
        f"vocab {cfg.get('vocab')!r}" + (" (--data given)" if opts.data else ""))
    data = reopen_data(cfg, opts.data)
    saved = saved_relations(run_dir)
    if not saved:
        raise RunFolderError(f"{run_dir} holds no saved prompts (expected RELATION/prompt.safetensors)")
    ids = saved
    if opts.relation or opts.all:
        asked = relation_ids(data, opts.relation, opts.all)
        missing = [r for r in asked if r not in saved] if opts.relation else []
        if missing:
            raise RunFolderError(f"{run_dir} has no saved prompt for {', '.join(missing)} (it has {', '.join(saved)})")
        ids = [r for r in saved if r in asked]
    recorded = str(cfg.get("device", "cpu"))  # a GPU run on a GPU here, a CPU run on the CPU, unless --device says
    backend = load_backend(cfg["model"], device=opts.device or ("auto" if recorded.startswith("cuda") else "cpu"),
                           dtype=cfg.get("dtype", "float32"),
                           control=cfg.get("control", "none"), seed=cfg.get("seed") or 0)
    if backend.kind != cfg["model_kind"]:
        raise ModelError(f"run folder {run_dir} was trained on a {cfg['model_kind']} LM, {cfg['model']!r} is {backend.kind}")
    candidates = run_candidates(cfg).build(backend.tokenizer, data)
    return reevaluate_run(backend, data, run_dir, candidates, batch_size, ids, opts.threads, log)


def check_recorded_model(run_dir: Path, cfg: dict, named: bool, allow_download: bool) -> None:
    """A run folder is data, not orders: the hub model its config names loads only if the user named it (--model)
    or allowed downloads."""
    model = cfg.get("model")
    if not isinstance(model, str) or not model:
        raise RunFolderError(f"{run_dir}/config.json names no model: expected the run folder of `probe train`")
    if is_hub_id(model) and not (named or allow_download):
        raise ModelError(f"run folder {run_dir} names the hub model {model!r}, which is not on this machine: pass "
                         f"--model {model} (or --allow-download) to load it from the hub")


def run_candidates(cfg: dict) -> CandidateChoice:
    """The candidates a run's config records: single tokens of its vocabulary, or objects of any length."""
    if cfg.get("objects") != "any":
        return CandidateChoice(cfg["vocab"])
    source = cfg.get("candidates")
    return CandidateChoice("objects", ObjectsSpec(None if source == "relation objects" else source,
                                                  bool(cfg.get("length_norm"))))


def reevaluate_run(backend: Backend, data: FactData, run_dir: Path, candidates, batch_size: int = 128,
                   ids: list[str] | None = None, threads: int | None = None, log=print) -> list[dict]:
    """Re-evaluate the saved prompts of a run folder (all, or `ids`); rows carry the saved and recomputed metrics.

    On CPU each relation runs with the torch threads its fit recorded (bfloat16 sums, so a few ranks, depend on
    them), unless `threads` is given: then a warning names the relations whose fits had another count."""
    rows, other = [], []
    for rid in tqdm(ids or saved_relations(run_dir), desc="eval", unit="relation", dynamic_ncols=True):
        folder = Path(run_dir) / rid
        rel_cfg = read_json(folder / "config.json")
        metrics = read_json(folder / "metrics.json")
        relation = data.relation(rel_cfg["relation"])
        manual = rel_cfg.get("manual_template") or relation.template
        compiled = compile_template(rel_cfg["template"], backend.tokenizer, backend.kind, manual=manual)
        prompt = load_prompt(folder / "prompt.safetensors").to(backend.device)
        if prompt.n_virtual != compiled.n_virtual:
            raise RunFolderError(f"{folder}: {prompt.n_virtual} saved vectors for {compiled.n_virtual} virtual slots")
        facts, _ = relation_facts(data, relation, rel_cfg["split"], candidates, True)
        recorded = rel_cfg.get("torch_threads")
        if threads and recorded and threads != recorded:
            other.append(f"{rid} ({recorded})")
        with torch_threads((threads or recorded) if backend.device.type == "cpu" else None):
            result = evaluate_facts(backend, prompt, compiled, facts, candidates.for_relation(relation.id), batch_size)
        rows.append({**metrics, **{f"saved_{k}": metrics[k] for k in ("p1", "p10", "mrr")}, **result.metrics,
                     "n_facts": len(facts)})
    if not rows:
        raise RunFolderError(f"{run_dir} holds no saved prompts (expected RELATION/prompt.safetensors)")
    if other:
        log(f"warning: --threads {threads}: {', '.join(other)} were fit with other torch thread counts (in brackets); "
            "on CPU their figures may not reproduce")
    return rows


def rerun_table(rows: list[dict]) -> tuple[str, bool]:
    """What `probe eval --prompts` prints: saved and recomputed figures side by side, how many reproduce; and whether
    all do."""
    import pandas as pd

    df = pd.DataFrame(rows)[["relation", "type", "n_facts", "saved_p1", "p1", "saved_p10", "p10", "saved_mrr", "mrr"]]
    df["same"] = [all(r[k] == r[f"saved_{k}"] for k in ("p1", "p10", "mrr")) for r in rows]
    same = int(df["same"].sum())
    text = (df.to_string(index=False, float_format=lambda v: f"{v:.3f}")
            + f"\n\n{same} of {len(df)} relations reproduce the saved test figures exactly")
    return text, same == len(df)
