"""Facts per second of manual-prompt evaluation: a straightforward loop against probe's evaluator.

The straightforward loop: batch 64, float32, full forward with logits at every position over the
whole vocabulary, then the rank of the gold object among the candidates. probe's evaluator: the
dtype asked for, batches sorted by length, logits only at the target and only for candidate rows.
The two take turns relation by relation, so that drift in the machine's speed hits both alike.

    python benchmarks/eval_speed.py --relations P19 P20 P27 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from probe.backends import load_backend
from probe.batching import filter_facts, make_batches
from probe.data import LamaData
from probe.evaluator import evaluate_facts
from probe.methods import get_method
from probe.metrics import ranks_of
from probe.templates import compile_template
from probe.vocab import build_candidates


@torch.no_grad()
def straightforward_ranks(backend, compiled, facts, candidates, batch_size=64) -> list[int]:
    """Unsorted batches, full-vocabulary logits at every position, then pick the target and the candidates."""
    ranks = []
    order = list(range(len(facts)))
    for i in range(0, len(order), batch_size):
        chunk = [facts[j] for j in order[i : i + batch_size]]
        batch = make_batches(compiled, chunk, candidates, len(chunk), backend.pad_id, torch.Generator())[0]
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

    # Relation by relation, probe's evaluator and then the straightforward loop, so that both see the same
    # machine: this VM's speed drifts by 10-20 % within minutes.
    fast_s = base_s = 0.0
    fast_hits = base_hits = 0
    for rel, facts in tqdm(work, desc="relations"):
        compiled = compile_template(rel.template, fast.tokenizer, fast.kind)
        t = time.perf_counter()
        fast_hits += sum(r == 1 for r in evaluate_facts(fast, manual, compiled, facts, candidates, args.batch_size).ranks)
        fast_s += time.perf_counter() - t
        if base is not None:
            t = time.perf_counter()
            base_hits += sum(r == 1 for r in straightforward_ranks(base, compiled, facts, candidates))
            base_s += time.perf_counter() - t
    print(f"probe evaluator ({args.dtype}, batch {args.batch_size}): {n} facts in {fast_s:.1f}s = "
          f"{n / fast_s:.1f} facts/s, micro P@1 {100 * fast_hits / n:.2f}")
    if base is None:
        return
    print(f"straightforward (float32, batch 64, all logits): {n} facts in {base_s:.1f}s = "
          f"{n / base_s:.1f} facts/s, micro P@1 {100 * base_hits / n:.2f}")
    print(f"speed-up {base_s / fast_s:.2f}x")


if __name__ == "__main__":
    main()
