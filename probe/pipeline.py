"""Evaluate a method on many relations with one model load, saving each relation as it finishes."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from probe import __version__
from probe.backends import LMBackend
from probe.batching import filter_facts
from probe.data import LamaData, Relation
from probe.errors import ProbeError
from probe.evaluate import evaluate_ensemble, evaluate_facts, evaluate_majority
from probe.methods import get_method
from probe.prompt_files import DiscretePrompt
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
        **({"control": backend.control} if backend.control != "none" else {}),  # absent for the real LM
        **extra,
    }


def evaluate_relations(
    backend: LMBackend,
    data: LamaData,
    relation_ids: list[str],
    candidates: CandidateVocab,
    run: RunFolder,
    settings: EvalSettings,
    prompts: dict[str, list[DiscretePrompt]] | None = None,
) -> dict:
    """Evaluate fixed prompts into a run folder; returns the results.

    Each relation gets its manual template, or its prompts from `prompts` (several are an ensemble, see
    evaluate_ensemble); method 'majority' ranks candidates by train frequency instead, without the LM.
    """
    method_cls = get_method(settings.method)
    strict = len(relation_ids) == 1
    todo = []
    for rid in relation_ids:
        relation = data.relation(rid)
        if run.is_done(rid):
            continue
        facts, dropped = relation_facts(data, relation, settings.split, candidates, strict)
        todo.append((relation, facts, dropped))
    n_prompts = {r.id: len(prompts[r.id]) if prompts else 1 for r, _, _ in todo}
    with tqdm(total=sum(len(f) * n_prompts[r.id] for r, f, _ in todo), unit="fact", desc="eval", dynamic_ncols=True) as bar:
        for relation, facts, dropped in todo:
            bar.set_postfix_str(relation.id)
            base = {"relation": relation.id, "label": relation.label, "type": relation.type, "n_dropped": dropped}
            if not facts:
                tqdm.write(f"warning: {relation.id} has no {settings.split} facts left after filtering; skipped", file=sys.stderr)
                continue
            if settings.method == "majority":
                train, _ = relation_facts(data, relation, "train", candidates, False)
                result = evaluate_majority(train, facts, candidates)
                bar.update(len(facts))
                metrics = {**base, "n_facts": len(facts), "n_train": len(train), **result.metrics}
                run.save_relation(relation.id, metrics, result.predictions())
                continue
            chosen = prompts[relation.id] if prompts else [DiscretePrompt(relation.template, None, "manual")]
            compiled = [compile_template(p.template, backend.tokenizer, backend.kind) for p in chosen]
            weights = [1.0 if p.weight is None else p.weight for p in chosen]
            method = method_cls(0, backend.hidden_size).to(backend.device)
            result = evaluate_ensemble(backend, method, compiled, weights, facts, candidates, settings.batch_size, bar)
            metrics = {**base, "n_facts": len(facts), "template": chosen[0].template, **result.metrics}
            if len(chosen) > 1:
                metrics.update(templates=[p.template for p in chosen], weights=weights)
            run.save_relation(relation.id, metrics, result.predictions())
    return run.write_summary()


# ----------------------------------------------------------------------------------------------
# Training many relations, and reloading what was trained.
# ----------------------------------------------------------------------------------------------


def load_template_spec(spec: str | None, method: str | None = None):
    """`--template`: a template file, an inline template, or None for the default shapes.

    The defaults are the P-tuning shapes, unless the method has its own (prefix-tuning puts its prefix first).
    """
    from pathlib import Path

    from probe.templates import DEFAULT_SHAPES, TemplateFile, parse_template, parse_template_file

    defaults = dict(get_method(method).default_shapes or DEFAULT_SHAPES) if method else dict(DEFAULT_SHAPES)
    if spec is None:
        return TemplateFile("<default>", {}, defaults)
    if Path(spec).is_file() or spec.endswith((".txt", ".tpl")):
        tf = parse_template_file(spec)
        tf.defaults = defaults
        return tf
    return TemplateFile("<inline>", {"default": parse_template(spec)}, defaults)


def save_prompt(path, method) -> None:
    """What evaluation uses (virtual embeddings, or per-layer prefix keys and values), in one safetensors file.

    The method's own weights are added unless it folds them away (prefix-tuning keeps only the MLP's output).
    """
    import torch
    from safetensors.torch import save

    from probe.runs import atomic_write_bytes

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
    atomic_write_bytes(path, save(tensors))


def load_prompt(path):
    """A FixedPrompt from a saved prompt file; a damaged file is a ProbeError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from probe.methods import FixedPrompt

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


def fit_prompt(backend, method_name, method_config, compiled, manual_template, train, dev, candidates, train_config,
               log_path=None, desc: str = "train"):
    """Create a method (seeded by the train config) and fit it on train with selection on dev: (method, result)."""
    import torch

    from probe.autoprompt import search_triggers
    from probe.train import train_prompt

    torch.manual_seed(train_config.seed)
    method = get_method(method_name).create(backend, compiled, manual_template, method_config).to(backend.device)
    fit = search_triggers if method_name == "autoprompt" else train_prompt  # a discrete search, not SGD
    result = fit(backend, method, compiled, train, dev, candidates, train_config, log_path, desc=desc)
    return method, result


def train_relations(backend, data, relation_ids, candidates, run, method_name, method_config, train_config,
                    template_spec, settings: EvalSettings) -> dict:
    """Train and test one prompt per relation into a run folder, skipping finished relations."""
    from probe.runs import atomic_write_json

    method_cls = get_method(method_name)
    if not method_cls.trainable:
        raise ProbeError(f"method {method_name!r} has nothing to train: use `probe eval --method {method_name}`")
    templates = load_template_spec(template_spec, method_name)
    strict = len(relation_ids) == 1
    todo = [data.relation(r) for r in relation_ids if not run.is_done(r)]
    compiled_for = {}
    for relation in todo:  # every template is checked before any training starts
        template = method_cls.relation_template(templates.template_for(relation.id, backend.kind), relation.template,
                                                backend.kind, method_config)
        compiled = compile_template(template, backend.tokenizer, backend.kind, manual=relation.template)
        if compiled.n_virtual == 0:
            raise ProbeError(f"template {template.source!r} has no virtual tokens: method {method_name!r} needs some")
        method_cls.check_template(compiled)
        compiled_for[relation.id] = (template, compiled)
    for i, relation in enumerate(todo, 1):
        template, compiled = compiled_for[relation.id]
        train, _ = relation_facts(data, relation, "train", candidates, False)
        if not train:
            msg = f"relation {relation.id} has no train facts left after filtering by the candidate vocabulary"
            if strict:
                raise ProbeError(msg)
            tqdm.write(f"warning: {msg}; skipped", file=sys.stderr)
            continue
        dev, _ = relation_facts(data, relation, "dev", candidates, False)
        dev = dev or train
        test, dropped = relation_facts(data, relation, settings.split, candidates, strict)
        if not test:
            tqdm.write(f"warning: relation {relation.id} has no {settings.split} facts left after filtering; skipped",
                       file=sys.stderr)
            continue
        folder = run.relation_dir(relation.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train_log.jsonl").unlink(missing_ok=True)
        method, result = fit_prompt(backend, method_name, method_config, compiled, relation.template, train, dev,
                                    candidates, train_config, folder / "train_log.jsonl",
                                    desc=f"{relation.id} [{i}/{len(todo)}]")
        test_eval = evaluate_facts(backend, method, compiled, test, candidates, settings.batch_size)
        manual = compile_template(relation.template, backend.tokenizer, backend.kind)
        manual_method = get_method("manual")(0, backend.hidden_size)
        manual_dev = evaluate_facts(backend, manual_method, manual, dev, candidates, settings.batch_size).metrics
        manual_test = evaluate_facts(backend, manual_method, manual, test, candidates, settings.batch_size).metrics
        save_prompt(folder / "prompt.safetensors", method)
        atomic_write_json(folder / "config.json", {
            **{k: run.config[k] for k in ("probe_version", "model", "model_kind", "data", "vocab", "split")},
            "relation": relation.id,
            "method": method_name,
            "method_config": method.config.__dict__,
            "template": template.source,
            "manual_template": relation.template,
            "n_virtual": compiled.n_virtual,
            "hidden_size": backend.hidden_size,
            "train": train_config.__dict__,
            "n_train": len(train),
            "n_dev": len(dev),
            "best_step": result.best_step,
            "steps": result.steps,
            **method.saved_info(compiled),
        })
        metrics = {
            "relation": relation.id, "label": relation.label, "type": relation.type,
            "n_facts": len(test), "n_dropped": dropped, "template": template.source,
            **test_eval.metrics,
            **{f"dev_{k}": v for k, v in result.best_dev.items()},
            **{f"manual_{k}": v for k, v in manual_test.items()},
            **{f"manual_dev_{k}": v for k, v in manual_dev.items()},
        }
        run.save_relation(relation.id, metrics, test_eval.predictions())
        tqdm.write(
            f"{relation.id:>6} {relation.label[:28]:28} dev P@1 {result.best_dev['p1']:5.1f} "
            f"(manual {manual_dev['p1']:5.1f})  test P@1 {test_eval.metrics['p1']:5.1f} "
            f"(manual {manual_test['p1']:5.1f})  P@10 {test_eval.metrics['p10']:5.1f}  MRR {test_eval.metrics['mrr']:.3f}"
        )
    return run.write_summary()


def reevaluate_run(backend, data, run_dir, candidates, batch_size: int = 128) -> list[dict]:
    """Re-evaluate every saved prompt of a run folder; rows carry saved and recomputed metrics."""
    from pathlib import Path

    from probe.runs import read_json

    rows = []
    finished = [p.parent / "prompt.safetensors" for p in Path(run_dir).glob("P*/metrics.json")]
    for folder in sorted(finished, key=lambda p: int(p.parent.name[1:])):
        cfg = read_json(folder.parent / "config.json")
        saved = read_json(folder.parent / "metrics.json")
        relation = data.relation(cfg["relation"])
        compiled = compile_template(cfg["template"], backend.tokenizer, backend.kind, manual=relation.template)
        prompt = load_prompt(folder).to(backend.device)
        if prompt.n_virtual != compiled.n_virtual:
            raise ProbeError(f"{folder}: {prompt.n_virtual} saved vectors for {compiled.n_virtual} virtual slots")
        facts, _ = relation_facts(data, relation, cfg["split"], candidates, True)
        result = evaluate_facts(backend, prompt, compiled, facts, candidates, batch_size)
        rows.append({**saved, **{f"saved_{k}": saved[k] for k in ("p1", "p10", "mrr")}, **result.metrics,
                     "n_facts": len(facts)})
    if not rows:
        raise ProbeError(f"{run_dir} holds no saved prompts (expected P*/prompt.safetensors)")
    return rows
