"""Evaluate a method on many relations with one model load, saving each relation as it finishes."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from probe import __version__
from probe.backends import LMBackend
from probe.batching import filter_facts
from probe.data import LamaData, Relation
from probe.errors import ProbeError
from probe.evaluate import evaluate_facts
from probe.methods import get_method
from probe.runs import RunFolder
from probe.templates import compile_template
from probe.vocab import CandidateVocab


@dataclass
class EvalSettings:
    """What an evaluation run needs besides the model and data."""

    method: str = "manual"
    split: str = "test_34k"
    vocab: str = "common"
    batch_size: int = 128


def relation_facts(data: LamaData, relation: Relation, split: str, candidates: CandidateVocab, strict: bool):
    """Facts of a split whose object is a candidate; with strict, none left is a ProbeError."""
    facts, dropped = filter_facts(data.facts(relation.id, split), candidates)
    if not facts and strict:
        raise ProbeError(
            f"relation {relation.id} has no {split} facts left after keeping objects that are single tokens "
            f"of the candidate vocabulary ({dropped} dropped)"
        )
    return facts, dropped


def run_config(backend: LMBackend, data: LamaData, settings: EvalSettings, candidates: CandidateVocab, **extra) -> dict:
    """The config saved with every result: enough to know exactly what produced it."""
    return {
        "command": "eval",
        "probe_version": __version__,
        "model": backend.name,
        "model_kind": backend.kind,
        "method": settings.method,
        "data": str(data.root.resolve()),
        "split": settings.split,
        "vocab": settings.vocab,
        "n_candidates": len(candidates),
        "n_vocab_words": candidates.n_source,
        "batch_size": settings.batch_size,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "device": str(backend.device),
        "template_file": None,
        "seed": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }


def evaluate_manual_relations(
    backend: LMBackend,
    data: LamaData,
    relation_ids: list[str],
    candidates: CandidateVocab,
    run: RunFolder,
    settings: EvalSettings,
) -> dict:
    """Evaluate the manual prompts of the given relations into a run folder; returns the results."""
    method_cls = get_method(settings.method)
    strict = len(relation_ids) == 1
    todo = []
    for rid in relation_ids:
        relation = data.relation(rid)
        if run.is_done(rid):
            continue
        facts, dropped = relation_facts(data, relation, settings.split, candidates, strict)
        todo.append((relation, facts, dropped))
    with tqdm(total=sum(len(f) for _, f, _ in todo), unit="fact", desc="eval", dynamic_ncols=True) as bar:
        for relation, facts, dropped in todo:
            bar.set_postfix_str(relation.id)
            base = {"relation": relation.id, "label": relation.label, "type": relation.type, "n_dropped": dropped}
            if not facts:
                tqdm.write(f"warning: {relation.id} has no {settings.split} facts left after filtering; skipped")
                continue
            compiled = compile_template(relation.template, backend.tokenizer, backend.kind)
            method = method_cls(compiled.n_virtual, backend.hidden_size).to(backend.device)
            result = evaluate_facts(backend, method, compiled, facts, candidates, settings.batch_size, bar)
            metrics = {**base, "n_facts": len(facts), "template": relation.template, **result.metrics}
            run.save_relation(relation.id, metrics, result.predictions())
    return run.write_summary()
