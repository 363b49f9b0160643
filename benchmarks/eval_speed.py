"""Facts per second of manual-prompt evaluation: a straightforward loop against probe's evaluator.

The straightforward loop: batch 64, float32, full forward with logits at every position over the
whole vocabulary, then the rank of the gold object among the candidates. probe's evaluator: the
dtype asked for, batches sorted by length, logits only at the target and only for candidate rows.

    python benchmarks/eval_speed.py --relations P19 P20 P27 --dtype bfloat16
    python benchmarks/eval_speed.py --relations P19 P20 P27 --workers 2   # probe eval --workers 2

With --workers N the evaluator runs as `probe eval --workers N` does, and its time includes starting the
workers and their model loads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from probe.backends import load_backend
from probe.batching import filter_facts, make_batches
from probe.data import LamaData
from probe.evaluate import evaluate_facts, pad_id
from probe.methods import get_method
from probe.metrics import ranks_of
from probe.pipeline import EvalSettings
from probe.runs import RunFolder
from probe.templates import compile_template
from probe.vocab import build_candidates
from probe.workers import evaluate_in_workers


@torch.no_grad()
def straightforward_ranks(backend, compiled, facts, candidates, batch_size=64) -> list[int]:
    """Unsorted batches, full-vocabulary logits at every position, then pick the target and the candidates."""
    ranks = []
    order = list(range(len(facts)))
    for i in range(0, len(order), batch_size):
        chunk = [facts[j] for j in order[i : i + batch_size]]
        batch = make_batches(compiled, chunk, candidates, len(chunk), pad_id(backend), torch.Generator())[0]
        logits = backend.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        target = logits[torch.arange(len(chunk)), batch.target][:, candidates.token_ids].float()
        ranks.extend(ranks_of(target, batch.gold).tolist())
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--relations", nargs="*", default=None, help="default: all")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    data = LamaData(args.data)
    ids = args.relations or list(data.relations)
    work = []
    base = load_backend(args.model, dtype="float32") if not args.skip_baseline else None
    fast = load_backend(args.model, dtype=args.dtype)
    candidates = build_candidates(fast.tokenizer, data.vocab_words("common"))
    for rid in ids:
        rel = data.relation(rid)
        facts, _ = filter_facts(data.facts(rid, "test_34k"), candidates)
        work.append((rel, facts))
    n = sum(len(f) for _, f in work)
    manual = get_method("manual")(0, fast.hidden_size)

    t = time.perf_counter()
    hits = 0
    if args.workers > 1:
        with tempfile.TemporaryDirectory() as tmp:
            run = RunFolder(Path(tmp) / "run", {"command": "eval"})
            load_args = {"name": args.model, "dtype": args.dtype}
            settings = EvalSettings(batch_size=args.batch_size)
            results = evaluate_in_workers(load_args, data, ids, candidates, run, settings, None, args.workers)
            hits = sum(round(r["p1"] * r["n_facts"] / 100) for r in results["relations"])
    else:
        for rel, facts in work:
            compiled = compile_template(rel.template, fast.tokenizer, fast.kind)
            hits += sum(r == 1 for r in evaluate_facts(fast, manual, compiled, facts, candidates, args.batch_size).ranks)
    fast_s = time.perf_counter() - t
    shown = f", {args.workers} workers" if args.workers > 1 else ""
    print(f"probe evaluator ({args.dtype}, batch {args.batch_size}{shown}): {n} facts in {fast_s:.1f}s = "
          f"{n / fast_s:.1f} facts/s, micro P@1 {100 * hits / n:.2f}")
    if base is None:
        return
    t = time.perf_counter()
    hits = 0
    for rel, facts in work:
        compiled = compile_template(rel.template, base.tokenizer, base.kind)
        hits += sum(r == 1 for r in straightforward_ranks(base, compiled, facts, candidates))
    base_s = time.perf_counter() - t
    print(f"straightforward (float32, batch 64, all logits): {n} facts in {base_s:.1f}s = "
          f"{n / base_s:.1f} facts/s, micro P@1 {100 * hits / n:.2f}")
    print(f"speed-up {base_s / fast_s:.1f}x")


if __name__ == "__main__":
    main()
