"""The speed of --objects any evaluation against a straightforward loop: one plain forward pass of the model per
fact and candidate (prompt + candidate tokens), on the same facts, in the same process, one after the other.

    python benchmarks/internal/objects_speed.py --relation P19 --facts 16 [--model smollm2] [--dtype bfloat16]

Prints facts/s of each, the ratio, and the largest difference between the two sets of scores.
"""

from __future__ import annotations

import argparse
import time

import torch

from probe.backends import load_backend
from probe.batching import collate
from probe.data import open_data
from probe.methods.manual import ManualPrompt
from probe.objects import ObjectsSpec, RelationCandidates
from probe.templates import compile_template


def loop_scores(backend, compiled, facts, candidates) -> torch.Tensor:
    """log p(candidate | prompt) of every fact and candidate, one forward pass each."""
    out = torch.empty(len(facts), len(candidates), dtype=torch.float64)
    for i, fact in enumerate(facts):
        enc = compiled.encode_fact(fact)
        prompt = enc.input_ids[: enc.target + 1]
        for c, seq in enumerate(candidates.sequences):
            logits = backend.model(input_ids=torch.tensor([prompt + list(seq)])).logits[0].float()
            logp = logits[enc.target : enc.target + len(seq)].log_softmax(-1)
            out[i, c] = float(sum(logp[k, t] for k, t in enumerate(seq)))
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relation", default="P19")
    parser.add_argument("--facts", type=int, default=16)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    backend = load_backend(args.model, dtype=args.dtype)
    data = open_data(args.data)
    relation = data.relation(args.relation)
    candidates = RelationCandidates(backend.tokenizer, data, ObjectsSpec()).for_relation(relation.id)
    facts = data.facts(relation.id, "test")[: args.facts]
    compiled = compile_template(relation.template, backend.tokenizer, backend.kind)
    batch = collate(compiled, facts, candidates, backend.pad_id)
    prompt = ManualPrompt(0, backend.hidden_size).prompt_inputs()
    (warm,) = backend.score([collate(compiled, facts[:1], candidates, backend.pad_id)], prompt, candidates)
    t0 = time.time()
    (fast,) = backend.score([batch], prompt, candidates)
    t_fast = time.time() - t0
    t0 = time.time()
    slow = loop_scores(backend, compiled, facts, candidates)
    t_slow = time.time() - t0
    print(f"{relation.id}: {len(facts)} facts x {len(candidates)} candidates, "
          f"{len(candidates.contexts(backend.kind).keys) - 1} inner trie nodes")
    print(f"--objects any: {t_fast:.1f}s, {len(facts) / t_fast:.2f} facts/s")
    print(f"one forward per fact and candidate: {t_slow:.1f}s, {len(facts) / t_slow:.3f} facts/s")
    print(f"speed-up: {t_slow / t_fast:.1f}x; largest score difference {float((fast - slow).abs().max()):.4f} nats; "
          f"same best candidate for {int((fast.argmax(1) == slow.argmax(1)).sum())}/{len(facts)} facts")


if __name__ == "__main__":
    main()
