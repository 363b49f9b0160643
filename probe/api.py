"""probe from Python: load a model once, evaluate and train prompts, get pandas tables back.

    import probe
    model = probe.load_model("smollm2")
    manual = probe.evaluate(model, relations=["P36"])
    manual.summary                      # macro / micro P@1, P@10, MRR per relation type
    run = probe.train(model, relations=["P36"], method="ptuning", seed=13)
    run.relations                       # one row per relation: test, dev and manual figures, flags
    run.prompts["P36"].save("p36")      # a trained prompt; probe.load_prompt("p36") reads it back

The functions run the same cells as the CLI (`probe eval`, `probe train`): the figures are the same. Without `out=`
nothing is written; with it, the run folder is the CLI's. Mistakes raise ProbeError with the CLI's one-line messages,
before any model loads where the CLI checks them; progress goes to tqdm, warnings and per-relation lines to the
`probe` logger (`logging.getLogger("probe").setLevel(logging.ERROR)` silences them).

`probe eval` and `probe train` are `eval_command` and `train_command` (probe/commands/dispatch.py) on the flags as an
`Options`; `evaluate` and `train` call them too when they write a run folder (`out=`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from probe.backends import Backend, load_backend
from probe.backends.loading import resolve_device
from probe.cells import CellOutput, LoadedModel, ModelSpec, torch_threads
from probe.commands.dispatch import CommandResult, eval_command, train_command
from probe.commands.eval import EvalCell
from probe.commands.train import TrainCell, compiled_templates
from probe.comparison import Comparison, compare_runs, load_runs
from probe.data import Fact, FactData
from probe.errors import DataError, ModelError, RunFolderError
from probe.evaluator import evaluate_facts
from probe.metrics import aggregate
from probe.options import Options
from probe.pack import default_pack, packed
from probe.runs import summary_table
from probe.saved_prompts import load_prompt as load_prompt_file
from probe.spec import resolve_eval, resolve_train
from probe.templates import compile_template
from probe.vocab import CandidateChoice, build_candidates

logger = logging.getLogger("probe")


@dataclass
class Model:
    """A loaded LM, reused by every call: its name, kind (masked or causal), device and dtype."""

    backend: Backend
    spec: ModelSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def hf_model(self):
        """The transformers model (frozen, in eval mode)."""
        return self.backend.model

    @property
    def tokenizer(self):
        """The transformers tokenizer."""
        return self.backend.tokenizer

    @classmethod
    def from_hf(cls, hf_model, tokenizer, name: str, device: str = "cpu") -> Model:
        """A Model around a transformers model and tokenizer already in memory (random weights of a config, say),
        behind the backend its config asks for, as `load_model` picks it."""
        from probe.backends import backend_class, model_kind

        backend = backend_class(hf_model.config, model_kind(hf_model.config))(hf_model, tokenizer, name, device)
        return cls(backend, ModelSpec.of(backend))

    def loaded(self, data: FactData, candidates: CandidateChoice) -> LoadedModel:
        """What cells run against: this model, the data and its candidates."""
        return LoadedModel(self.backend, data, candidates.build(self.backend.tokenizer, data), self.spec)


def load_model(name: str = "smollm2", device: str = "auto", dtype: str = "bfloat16") -> Model:
    """Load a model once: 'smollm2', a hub id, a local folder or a .gguf file; device auto (a GPU when there is
    one), cpu, cuda or cuda:N; dtype bfloat16, float32 or float16 (as `probe eval --model --device --dtype`)."""
    device = resolve_device(device)
    backend = load_backend(name, device=device, dtype=dtype)
    return Model(backend, ModelSpec(name, device, dtype))


def model_folder(name: str = "smollm2") -> str:
    """Where `load_model(name)` loads from: a local folder (smollm2 and .gguf files: their converted copy) or a hub id."""
    from probe.backends import resolve_model

    return resolve_model(name)


def single_tokens(tokenizer, words: Iterable[str]) -> dict[str, int]:
    """The words that are one token for `tokenizer` (a Model's, or a transformers tokenizer), as probe's single-token
    candidates are built: word -> token id, in order (a word whose token an earlier word took is left out)."""
    vocab = build_candidates(tokenizer.tokenizer if isinstance(tokenizer, Model) else tokenizer, list(words))
    return dict(zip(vocab.words, vocab.token_ids.tolist(), strict=True))


@dataclass(frozen=True)
class Relation:
    """A relation: its id, label, type (1-1, N-1, N-M), manual template, every template (BEAR has several) and its
    answer space (BEAR's answers; empty where the data names none)."""

    id: str
    label: str
    type: str
    template: str
    templates: tuple[str, ...]
    answers: tuple[str, ...]


@dataclass
class Data:
    """Facts as `probe eval --data` reads them: `relations` (the ids), `relation(id)`, `facts(id, split)` as
    (subject, object) pairs, `vocab(name)`: a candidate vocabulary's words (common, 29k, objects or a file)."""

    source: FactData = field(repr=False)

    @property
    def relations(self) -> list[str]:
        return list(self.source.relations)

    def relation(self, rid: str) -> Relation:
        r = self.source.relation(rid)
        return Relation(r.id, r.label, r.type, r.template, r.all_templates(), tuple(r.answers))

    def facts(self, rid: str, split: str | None = None) -> list[tuple[str, str]]:
        """A relation's deduplicated facts of `split` (default: the test split), in file order."""
        return [(f.sub, f.obj) for f in self.source.facts(rid, split)]

    def vocab(self, name: str = "common") -> list[str]:
        return self.source.vocab_words(name)


def load_data(data: str | Path | None = None) -> Data:
    """A LAMA, facts or BEAR folder (default: $PROBE_DATA, else data/lama), as `probe eval --data` opens it."""
    from probe.data import open_data

    return Data(open_data(data))


@dataclass
class TrainedPrompt:
    """A trained prompt of one relation: its template, metrics (test, dev and the manual prompt's), its run config,
    and the saved tensors. `save(dir)` writes it as a run folder's relation folder; `probe.load_prompt` reads it."""

    relation: str
    metrics: dict
    config: dict
    tensors: bytes  # prompt.safetensors

    @property
    def template(self) -> str:
        return self.config["template"]

    @property
    def manual_template(self) -> str:
        return self.config["manual_template"]

    def save(self, folder: str | Path) -> Path:
        """prompt.safetensors, config.json and metrics.json in `folder` (made if needed); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prompt.safetensors").write_bytes(self.tensors)
        for name, value in (("config.json", self.config), ("metrics.json", self.metrics)):
            (folder / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return folder

    def score(self, model: Model, facts: Iterable[tuple[str, str]], candidates: Sequence[str] | None = None,
              batch_size: int = 128) -> pd.DataFrame:
        """Rank `candidates` (default: the facts' objects) for each (subject, object) pair given as plain Python
        values; one row per fact: subject, object, rank of the object, the top 10 words."""
        kept, vocab, compiled, prompt = self._inputs(model, facts, candidates)
        result = evaluate_facts(model.backend, prompt, compiled, kept, vocab, batch_size)
        return pd.DataFrame([{"subject": p["sub"], "object": p["obj"], "rank": p["rank"], "top10": p["top10"]}
                             for p in result.predictions()])

    @torch.no_grad()
    def logits(self, model: Model, facts: Iterable[tuple[str, str]], candidates: Sequence[str] | None = None,
               batch_size: int = 128) -> torch.Tensor:
        """The scores `score` ranks by: a (facts × candidates) float32 tensor of the candidates' logits after each
        fact's prompt, the candidates in the order given (those that are one token)."""
        from probe.evaluator import scored_batches

        kept, vocab, compiled, prompt = self._inputs(model, facts, candidates)
        rows = {f.sub: row for batch, scores in scored_batches(model.backend, prompt.prompt_inputs(), compiled, kept,
                                                              vocab, batch_size)
                for f, row in zip(batch.facts, scores, strict=True)}  # a subject has one input
        return torch.stack([rows[f.sub] for f in kept]).float()

    def _inputs(self, model: Model, facts: Iterable[tuple[str, str]], candidates: Sequence[str] | None):
        """The facts, candidates, compiled template and prompt that `score` and `logits` run."""
        pairs = [(str(s), str(o)) for s, o in facts]
        if not pairs:
            raise DataError("no facts given: expected (subject, object) pairs")
        words = list(dict.fromkeys(candidates if candidates is not None else [o for _, o in pairs]))
        vocab = build_candidates(model.backend.tokenizer, words)
        kept = [Fact(s, o) for s, o in pairs if o in vocab.index]
        if len(kept) < len(pairs):
            missing = next(o for _, o in pairs if o not in vocab.index)
            raise DataError(f"object {missing!r} is not one token of {model.name} among the candidates: a single-token "
                            "candidate is needed")
        compiled = compile_template(self.template, model.backend.tokenizer, model.kind, manual=self.manual_template)
        return kept, vocab, compiled, load_prompt_file_bytes(self.tensors).to(model.backend.device)


def load_prompt_file_bytes(blob: bytes):
    """A FixedPrompt from prompt.safetensors bytes."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        return load_prompt_file(f.name)


def load_prompt(folder: str | Path) -> TrainedPrompt:
    """A trained prompt saved by `TrainedPrompt.save`, or a relation folder of a `probe train` run."""
    from probe.files import read_json

    folder = Path(folder)
    if not (folder / "prompt.safetensors").is_file():
        raise RunFolderError(f"{folder} holds no saved prompt (expected prompt.safetensors, config.json, metrics.json)")
    config, metrics = read_json(folder / "config.json"), read_json(folder / "metrics.json")
    load_prompt_file(folder / "prompt.safetensors")  # a damaged file fails here
    return TrainedPrompt(config["relation"], metrics, config, (folder / "prompt.safetensors").read_bytes())


@dataclass
class Results:
    """A run's figures: `relations` (a row per relation), `summary` (macro and micro per relation type),
    `predictions` (per relation, a row per fact, when asked for), `prompts` (train: the trained prompts), and the run
    folder when `out=` was given, and `statements` (statement scoring: LM Pub Quiz's report, by template and domain)."""

    relations: pd.DataFrame
    summary: pd.DataFrame
    predictions: dict[str, pd.DataFrame] | None = None
    prompts: dict[str, TrainedPrompt] = field(default_factory=dict)
    folder: Path | None = None
    rows: list[dict] = field(default_factory=list, repr=False)
    statements: dict | None = None

    @property
    def macro_p1(self) -> float:
        """Macro P@1 over every relation (in %)."""
        return float(aggregate(self.rows)["all"]["macro_p1"])

    @property
    def n_facts(self) -> int:
        return int(sum(r["n_facts"] for r in self.rows))


def _collect(loaded: LoadedModel, cells: list, threads: int | None) -> dict[str, CellOutput]:
    """Run cells against a loaded model here, one after another, writing nothing: each finished cell's output."""
    import torch

    outputs: dict[str, CellOutput] = {}
    with torch_threads(threads or torch.get_num_threads()):
        for cell in cells:
            for member, output in cell.outputs(loaded):
                for warning in output.warnings:
                    logger.warning(warning)
                if output.message:
                    logger.info(output.message)
                outputs[member.key] = output
    return outputs


def _results(outputs: dict[str, CellOutput], predictions: bool, trained: bool) -> Results:
    """Results from cells' outputs: each relation's metrics.json, predictions.jsonl and, trained, its prompt."""
    rows, preds, prompts = [], {}, {}
    for rid, output in outputs.items():
        files = {name.split("/", 1)[1]: blob for name, blob in output.files}
        if "metrics.json" not in files:
            continue  # skipped (a warning said why)
        rows.append(json.loads(files["metrics.json"]))
        if predictions and "predictions.jsonl" in files:
            preds[rid] = pd.DataFrame([json.loads(x) for x in files["predictions.jsonl"].decode().splitlines()])
        if trained and "prompt.safetensors" in files:
            prompts[rid] = TrainedPrompt(rid, rows[-1], json.loads(files["config.json"]), files["prompt.safetensors"])
    if not rows:
        raise DataError("no relation was left to evaluate (the warnings say why)")
    return Results(pd.DataFrame(rows), summary_table(aggregate(rows)), preds if predictions else None, prompts, None,
                   rows)


def _from_folder(folder: Path, results: dict, predictions: bool) -> Results:
    """Results of a run the CLI's way, from its folder."""
    rows = results["relations"]
    preds = None
    if predictions:
        preds = {r["relation"]: pd.read_json(folder / r["relation"] / "predictions.jsonl", lines=True) for r in rows}
    prompts = {r["relation"]: load_prompt(folder / r["relation"]) for r in rows
               if (folder / r["relation"] / "prompt.safetensors").is_file()}
    return Results(pd.DataFrame(rows), summary_table(results["summary"]), preds, prompts, folder, rows,
                   results.get("bear"))


def _relations(relations: str | Sequence[str] | None) -> tuple[list[str] | None, bool]:
    """`relations`: "all", an id, or ids (a comma list works too)."""
    if relations is None or relations == "all":
        return None, relations == "all"
    return ([relations] if isinstance(relations, str) else list(relations)), False


def evaluate(model: Model, relations: str | Sequence[str] = "all", *, method: str = "manual",
             prompts: str | Path | None = None, data: str | Path | None = None, split: str | None = None,
             vocab: str | None = None, objects: str | None = None, candidates: str | Path | None = None,
             score: str | None = None, reduction: str | None = None, batch_size: int | None = None,
             threads: int | None = None, predictions: bool = False, out: str | Path | None = None) -> Results:
    """Evaluate fixed prompts (the relations' manual templates, or a prompts file: .jsonl, TSV or a folder of them) on
    `relations` ("all" or ids), as `probe eval` does. `objects="any"`: objects of any length (`candidates`: a
    candidates file); `score="statement"` (the default for a BEAR folder): each answer ranked by its whole statement's
    log-likelihood, `reduction` sum or mean, and `Results.statements` holds LM Pub Quiz's report; `out`: also write
    the CLI's run folder there."""
    from probe.commands.statements import resolve_statements, score_choice, statement_report

    ids, all_ = _relations(relations)
    opts = Options(model=[model.name], method=method if prompts is None else None, relation=ids, all=all_ or None,
                   split=split, vocab=vocab, data=None if data is None else str(data),
                   out=None if out is None else Path(out), batch_size=batch_size, device=model.spec.device,
                   dtype=model.spec.dtype, prompts_file=None if prompts is None else Path(prompts), threads=threads,
                   objects=objects, candidates=None if candidates is None else Path(candidates), score=score,
                   reduction=reduction)
    statements = prompts is None and score_choice(opts) == "statement"
    if out is not None:
        (run,) = eval_command(opts, log=logger.info, loaded=model.loaded).runs
        return _from_folder(run.folder.root, run.results, predictions)
    if statements:
        ss = resolve_statements(opts)
        loaded = model.loaded(ss.data, ss.candidates)
        result = _results(_collect(loaded, ss.cells(model.spec, Path(".")), threads), predictions, trained=False)
        result.statements = statement_report(result.rows)
        return result
    spec = resolve_eval(opts, log=logger.warning)  # every check `probe eval` makes, with its messages
    loaded = model.loaded(spec.data, spec.candidates)
    cells = [EvalCell(rid, model.spec, Path("."), spec.split, spec.batch_size, len(spec.relations) == 1,
                      spec.chosen[rid] if spec.chosen else None) for rid in spec.relations]
    return _results(_collect(loaded, cells, threads), predictions, trained=False)


def score_statements(model: Model, template: str, subjects: Sequence[str], answers: Sequence[str],
                     reduction: str = "sum", batch_size: int = 64) -> torch.Tensor:
    """The log-likelihood of every statement `template` makes ([X] a subject, [Y] an answer), as LM Pub Quiz scores
    it: a (subjects × answers) float64 tensor; `reduction` sum (LM Pub Quiz's default) or mean over the tokens."""
    from probe.statements import check_reduction, statement_scores

    check_reduction(reduction)
    if not subjects or not answers:
        raise DataError("score_statements needs at least one subject and one answer")
    return statement_scores(model.backend, template, [str(s) for s in subjects], [str(a) for a in answers],
                            reduction, batch_size)


def train(model: Model, relations: str | Sequence[str], *, method: str = "ptuning", data: str | Path | None = None,
          split: str | None = None, vocab: str = "common", template: str | None = None, fallback: str | None = None,
          preset: str | None = None, pack: int | None = None, threads: int | None = None, predictions: bool = False,
          out: str | Path | None = None, **settings: Any) -> Results:
    """Train a prompt per relation against the frozen LM, then test it next to the manual prompt, as `probe train`
    does. `settings`: the method's options (init, reparam, ...) and fit settings (lr, epochs, max_train, seed, ...);
    `out`: also write the CLI's run folder there."""
    ids, all_ = _relations(relations)
    opts = Options(model=[model.name], method=method, relation=ids, all=all_ or None, split=split, vocab=vocab,
                   data=None if data is None else str(data), out=None if out is None else Path(out),
                   device=model.spec.device, dtype=None if model.spec.dtype == "bfloat16" else model.spec.dtype,
                   template=template, fallback=fallback, preset=preset, pack=pack, threads=threads, settings=settings)
    if out is not None:
        (run,) = train_command(opts, log=logger.info, loaded=model.loaded).runs
        return _from_folder(run.folder.root, run.results, predictions)
    spec = resolve_train(opts)  # every check `probe train` makes, with its messages
    fit = spec.fit
    if spec.dtype not in (None, model.spec.dtype):
        raise ModelError(f"method {method!r} trains the LM's weights in {spec.dtype}: load the model with "
                         f"dtype={spec.dtype!r}")
    loaded = model.loaded(spec.data, spec.candidates)
    loaded.remote = True  # train logs go to scratch folders, returned with the files, then removed
    ids = list(spec.relations)
    templates_of = compiled_templates(model.backend, spec.data, ids, fit.method, fit.config, fit.templates)
    cells = [TrainCell(rid, model.spec, Path("."), fit.method, fit.config, fit.fit_config, templates_of[rid][0],
                       spec.split, {}, len(ids) == 1, f"[{i}/{len(ids)}]", fallback=fit.fallback)
             for i, rid in enumerate(ids, 1)]
    if fit.method_class.packable:
        cells = packed(cells, pack or default_pack(model.spec.device))
    return _results(_collect(loaded, cells, threads), predictions, trained=True)


def compare(runs: Sequence[str | Path | Results], allow_mixed: bool = False) -> Comparison:
    """`probe compare` on run folders (or Results written with `out=`): `.per_relation` and `.summary` DataFrames
    (P@1 per relation and method; macro/micro on the shared relations, gain over manual), `.seeds` for runs that
    differ only by seed, `.notes`."""
    folders = []
    for run in runs:
        if isinstance(run, Results):
            if run.folder is None:
                raise RunFolderError("a run compared must have a folder: pass out= to probe.evaluate or probe.train")
            folders.append(run.folder)
        else:
            folders.append(Path(run))
    loaded = load_runs(folders)
    if not loaded:
        raise RunFolderError("no finished run folder among the runs given")
    return compare_runs(loaded, allow_mixed=allow_mixed)


__all__ = ["CommandResult", "Data", "Model", "Relation", "Results", "TrainedPrompt", "compare", "eval_command", "evaluate",
           "load_data", "load_model", "load_prompt", "model_folder", "score_statements", "single_tokens", "train",
           "train_command"]
