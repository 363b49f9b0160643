"""Evaluation in several CPU processes (`probe eval --workers N`).

Each worker loads the model once with cores/N threads and takes relations in turn, largest first, saving
each into the shared run folder as it finishes (metrics.json last, so a relation is whole or absent).
Why it pays: LAMA inputs are ~7 tokens, so much of a forward is Python and small operations that one
process runs on one core at a time; N single-threaded processes keep every core busy. The results are
those of one process: every relation is evaluated by the same code on the same batches.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback

import torch
from tqdm import tqdm

from probe.data import LamaData
from probe.errors import ProbeError
from probe.pipeline import EvalSettings, evaluate_relation, relation_facts, relations_to_evaluate
from probe.prompt_files import DiscretePrompt
from probe.runs import RunFolder
from probe.vocab import CandidateVocab, build_candidates


class _Progress:
    """A stand-in for a tqdm bar in a worker: counts go to the parent's bar."""

    def __init__(self, events):
        self.events = events

    def update(self, n: int) -> None:
        self.events.put(("progress", n))


def _worker(load_args: dict, data_root: str, run_root: str, settings: EvalSettings,
            prompts: dict[str, list[DiscretePrompt]] | None, threads: int, tasks, events) -> None:
    """Load the model, then evaluate relation ids from `tasks` until a None; report through `events`."""
    from probe.backends import load_backend

    try:
        torch.set_num_threads(threads)
        backend = load_backend(**load_args)
        data = LamaData(data_root)
        candidates = build_candidates(backend.tokenizer, data.vocab_words(settings.vocab))
        run = RunFolder.open(run_root)
        while (rid := tasks.get()) is not None:
            relation = data.relation(rid)
            facts, dropped = relation_facts(data, relation, settings.split, candidates, False)
            evaluate_relation(backend, data, relation, facts, dropped, candidates, run, settings, prompts,
                              _Progress(events))
        events.put(("done", None))
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the parent reports it
        pass
    except ProbeError as e:
        events.put(("error", str(e)))
    except Exception:  # a bug: the parent shows the worker's traceback
        events.put(("error", "an evaluation worker failed:\n" + traceback.format_exc()))


def evaluate_in_workers(load_args: dict, data: LamaData, relation_ids: list[str], candidates: CandidateVocab,
                        run: RunFolder, settings: EvalSettings, prompts: dict[str, list[DiscretePrompt]] | None,
                        workers: int) -> dict:
    """evaluate_relations, spread over `workers` processes that each load the model with `load_args`."""
    todo = relations_to_evaluate(data, relation_ids, candidates, run, settings)
    n_prompts = {r.id: len(prompts[r.id]) if prompts else 1 for r, _, _ in todo}
    work = {r.id: len(f) * n_prompts[r.id] for r, f, _ in todo}
    workers = max(1, min(workers, len(work)))
    ctx = mp.get_context("spawn")
    tasks, events = ctx.Queue(), ctx.Queue()
    for rid in sorted(work, key=lambda r: -work[r]):
        tasks.put(rid)
    for _ in range(workers):
        tasks.put(None)
    threads = max(1, torch.get_num_threads() // workers)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(load_args, str(data.root), str(run.root), settings, prompts, threads, tasks, events))
             for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        with tqdm(total=sum(work.values()), unit="fact", desc=f"eval ({workers} workers)", dynamic_ncols=True) as bar:
            running = workers
            while running:
                try:
                    kind, value = events.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise ProbeError(f"an evaluation worker stopped with exit code {dead[0].exitcode} "
                                         "(out of memory? try fewer --workers)") from None
                    continue
                if kind == "progress":
                    bar.update(value)
                elif kind == "done":
                    running -= 1
                else:
                    raise ProbeError(value)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    return run.write_summary()
