"""`probe eval --score statement`: every answer ranked by the log-likelihood of its whole statement (BEAR / LM Pub
Quiz's protocol, probe/statements.py), on each of a relation's templates; reports accuracy (P@1) per template, their
mean per relation, then macro and micro over relations and by domain (bear.json, bear.md in the run folder)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from probe.cells import CellOutput, LoadedModel
from probe.commands.common import RunResult, execute, open_model, relation_output, relation_row, run_folder_for
from probe.commands.eval import RelationCell
from probe.controls import get_control
from probe.data import FactData, bear_folder, resolve_data_dir
from probe.errors import SettingError, check_positive
from probe.files import atomic_write_json, atomic_write_text
from probe.metrics import relation_metrics
from probe.objects import ObjectsSpec
from probe.options import Options, check_new_folder, load_data, make_executor, model_names, relation_ids
from probe.plots import plot_manual_scatter
from probe.runs import RunConfig, markdown_table
from probe.statements import check_reduction, gold_ranks, statement_scores
from probe.vocab import CandidateChoice

SCORES = ("object", "statement")
STATEMENT_FLAGS = {"model", "relation", "all", "split", "data", "out", "resume", "batch_size", "device", "dtype",
                   "threads", "score", "reduction", "method"}


def score_choice(opts: Options) -> str:
    """--score as given, else `statement` for a BEAR folder (--data or $PROBE_DATA) and `object` for any other data;
    checked, with --reduction, before any model loads."""
    facts_given = any(x is not None for x in (opts.facts, opts.train_facts, opts.dev_facts))
    bear = not facts_given and bear_folder(resolve_data_dir(opts.data)) is not None
    score = opts.score or ("statement" if bear else "object")
    if score not in SCORES:
        raise SettingError(f"--score {score!r}: expected object (the object's log-likelihood after the prompt) or "
                           "statement (the whole filled template's, as LM Pub Quiz)")
    if opts.reduction is not None:
        if score != "statement":
            raise SettingError("--reduction applies to --score statement")
        check_reduction(opts.reduction, "--reduction")
    return score


def relation_answers(data: FactData, rid: str) -> list[str]:
    """The answer space: a BEAR relation's own, else every distinct object of the relation across its splits."""
    if data.relation(rid).answers:
        return list(data.relation(rid).answers)
    return list(dict.fromkeys(f.obj for s in data.splits for f in data.facts(rid, s)))


@dataclass
class StatementCell(RelationCell):
    """One relation: every template's statements scored for every instance and answer."""

    split: str = "test"
    reduction: str = "sum"
    batch_size: int = 64

    def run(self, loaded: LoadedModel) -> CellOutput:
        data, backend = loaded.data, loaded.backend
        relation = data.relation(self.key)
        answers = relation_answers(data, relation.id)
        index = {a: i for i, a in enumerate(answers)}
        facts = [f for f in data.facts(relation.id, self.split) if f.obj in index]
        if not facts:
            return CellOutput(warnings=[f"{relation.id} has no {self.split} facts; skipped"])
        gold = torch.tensor([index[f.obj] for f in facts])
        templates = list(relation.all_templates())
        ranks, predictions, by_template = [], [], []
        for t, template in enumerate(tqdm(templates, desc=relation.id, unit="template", leave=False)):
            scores = statement_scores(backend, template, [f.sub for f in facts], answers, self.reduction,
                                      self.batch_size)
            r = gold_ranks(scores, gold).tolist()
            ranks += r
            by_template.append(100 * sum(x == 1 for x in r) / len(r))
            best = scores.argmax(dim=1).tolist()
            predictions += [{"sub": f.sub, "obj": f.obj, "template": t, "rank": rank, "pred": answers[b],
                             "score": round(float(s[b]), 6), "gold_score": round(float(s[g]), 6)}
                            for f, rank, b, s, g in zip(facts, r, best, scores, gold.tolist(), strict=True)]
        metrics = {**relation_row(relation), "n_facts": len(facts), "n_dropped": 0, "n_candidates": len(answers),
                   **relation_metrics(ranks), "p1": sum(by_template) / len(by_template), "p1_by_template": by_template,
                   "templates": templates, "domains": list(getattr(relation, "domains", ())),
                   "score": "statement", "reduction": self.reduction}
        return relation_output(relation.id, metrics, predictions)


@dataclass(frozen=True)
class StatementSpec:
    """A resolved `probe eval --score statement`: the model, data, relations, split, reduction and batch size."""

    model: str
    data: FactData
    relations: tuple[str, ...]
    split: str
    reduction: str
    batch_size: int

    @property
    def candidates(self) -> CandidateChoice:
        """Nothing is built from it: statements bring their answers."""
        return CandidateChoice("objects", ObjectsSpec())

    def cells(self, spec, root) -> list[StatementCell]:
        return [StatementCell(rid, spec, root, self.split, self.reduction, self.batch_size) for rid in self.relations]


def resolve_statements(opts: Options) -> StatementSpec:
    """Every check of `probe eval --score statement`, before a folder is made or a model loads."""
    opts.refuse(STATEMENT_FLAGS, "`probe eval --score statement` (each relation's own templates and answers)")
    if (opts.method or "manual") != "manual":
        raise SettingError(f"--score statement scores the relations' own templates: --method {opts.method} does not apply")
    batch_size = 64 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    (name,) = model_names(opts, several=False)
    check_new_folder(opts.out, opts.resume)
    data = load_data(opts)
    ids = relation_ids(data, opts.relation, opts.all)
    return StatementSpec(name, data, tuple(ids), data.split_name(opts.split), opts.reduction or "sum", batch_size)


def run_statement_eval(opts: Options, log=print, loaded=None) -> list[RunResult]:
    """`probe eval --score statement` for one model (`loaded(data, candidates)`: the Python API's model)."""
    t0 = time.time()
    ss = resolve_statements(opts)
    executor = make_executor(ss.data, ss.candidates, None, None, opts.threads, log)
    if loaded is not None:
        executor.loaded = loaded(ss.data, ss.candidates)
    try:
        spec, info = open_model(ss.model, opts.device, opts.dtype, executor, get_control(None))
        log(f"{info.name} ({info.kind} LM, {spec.dtype}): statements of {len(ss.relations)} relation(s), "
            f"reduction {ss.reduction}")
        config = RunConfig.of("eval", info, ss.data, n_candidates=0, n_vocab_words=0, method="manual", split=ss.split,
                              vocab="answers", batch_size=ss.batch_size, device=spec.device,
                              torch_threads=executor.threads, score="statement", reduction=ss.reduction)
        run = run_folder_for(opts.out, "statements", info.name, False, config.to_dict(), bool(opts.resume))
        cells = ss.cells(spec, run.root)
    except BaseException:
        executor.close()
        raise
    (results,) = execute(executor, [run], cells, "eval", log)
    results["bear"] = report = write_statement_report(run.root, results["relations"])
    if report:
        log(f"statements: macro accuracy {report['macro_accuracy']:.2f}, micro (LM Pub Quiz's) "
            f"{report['micro_accuracy']:.2f} over {report['relations']} relations; by domain and template in "
            f"{run.root / 'bear.md'}")
    return [RunResult(run, results, time.time() - t0)]


def statement_report(rows: list[dict]) -> dict:
    """Accuracy by template position, per relation (mean over templates), macro over relations, micro (LM Pub Quiz's
    `get_metrics(accumulate=True)`: relations weighted by their instances) and by domain (LM Pub Quiz's
    `accumulate="domains"`: a relation in k domains adds 1/k of its instances to each)."""
    if not rows:
        return {}
    n = sum(r["n_facts"] for r in rows)
    out = {"relations": len(rows), "instances": n, "macro_accuracy": sum(r["p1"] for r in rows) / len(rows),
           "micro_accuracy": sum(r["p1"] * r["n_facts"] for r in rows) / n}
    width = max(len(r.get("p1_by_template", [])) for r in rows)
    out["macro_accuracy_by_template"] = [
        sum(r["p1_by_template"][t] for r in rows if len(r["p1_by_template"]) > t)
        / max(1, sum(len(r["p1_by_template"]) > t for r in rows)) for t in range(width)]
    domains: dict[str, list[float]] = {}
    for r in rows:
        for d in r.get("domains") or []:
            weight = r["n_facts"] / len(r["domains"])
            acc = domains.setdefault(d, [0.0, 0.0, 0])
            acc[0] += weight
            acc[1] += weight * r["p1"]
            acc[2] += 1
    out["domains"] = {d: {"relations": k, "support": w, "accuracy": s / w} for d, (w, s, k) in sorted(domains.items())}
    return out


def write_statement_report(root, rows: list[dict]) -> dict:
    """bear.json and bear.md in the run folder: the report above, and a row per relation with each template's;
    templates.png: per relation, each other template's accuracy against the first's (where there are several)."""
    import pandas as pd

    report = statement_report(rows)
    atomic_write_json(root / "bear.json", report)
    if not report:
        return report
    table = pd.DataFrame([{"relation": r["relation"], "instances": r["n_facts"], "answers": r["n_candidates"],
                           "accuracy": r["p1"], **{f"template {t + 1}": a for t, a in enumerate(r["p1_by_template"])},
                           "domains": ", ".join(r.get("domains") or [])} for r in rows])
    domains = pd.DataFrame([{"domain": d, **v} for d, v in report.get("domains", {}).items()])
    text = (f"# Statements (accuracy = P@1 in %, mean over a relation's templates)\n\n"
            f"{report['relations']} relations, {report['instances']:,} instances: macro accuracy "
            f"{report['macro_accuracy']:.2f}, micro (LM Pub Quiz's, relations weighted by instances) "
            f"{report['micro_accuracy']:.2f}; by template position (macro): "
            f"{', '.join(f'{a:.2f}' for a in report['macro_accuracy_by_template'])}\n\n"
            + (markdown_table(domains) + "\n\n" if len(domains) else "") + markdown_table(table) + "\n")
    atomic_write_text(root / "bear.md", text)
    several = [r for r in rows if len(r["p1_by_template"]) > 1]
    first = [r["p1_by_template"][0] for r in several]
    plot_manual_scatter({f"template {t + 1}": (first, [r["p1_by_template"][t] for r in several])
                         for t in range(1, max((len(r["p1_by_template"]) for r in several), default=1))
                         if all(len(r["p1_by_template"]) > t for r in several)}, root / "templates.png")
    return report
