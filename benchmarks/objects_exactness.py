"""--objects any against the single-token evaluator: on facts whose object is one token, with the candidates
restricted to the single-token candidate set, the two must give the same ranks.

    python benchmarks/objects_exactness.py --relations P19,P36,P103 [--model smollm2] [--dtype bfloat16]

Prints, per relation, the facts compared, how many ranks and top-10 lists are identical, and P@1 of each path.
"""

from __future__ import annotations

import argparse

from probe.backends import load_backend
from probe.batching import relation_facts
from probe.data import open_data
from probe.evaluator import evaluate_facts
from probe.methods.manual import ManualPrompt
from probe.objects import object_candidates
from probe.templates import compile_template
from probe.vocab import build_candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relations", default="P19,P36,P103")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    backend = load_backend(args.model, dtype=args.dtype)
    data = open_data(args.data)
    single = build_candidates(backend.tokenizer, data.vocab_words("common"))
    anylen = object_candidates(backend.tokenizer, single.words)  # the same candidates, each a sequence of one token
    manual = ManualPrompt(0, backend.hidden_size)
    same_all = total = 0
    for rid in args.relations.split(","):
        relation = data.relation(rid)
        facts, _ = relation_facts(data, relation, "test", single, strict=True)
        compiled = compile_template(relation.template, backend.tokenizer, backend.kind)
        one = evaluate_facts(backend, manual, compiled, facts, single)
        other = evaluate_facts(backend, manual, compiled, facts, anylen)
        same = sum(a == b for a, b in zip(one.ranks, other.ranks, strict=True))
        same_top = sum(a == b for a, b in zip(one.top10, other.top10, strict=True))
        same_all, total = same_all + same, total + len(facts)
        print(f"{rid}: {len(facts)} facts, {len(single)} candidates; identical ranks {same}/{len(facts)}, identical top-10 "
              f"{same_top}/{len(facts)}; P@1 single {one.metrics['p1']:.2f}, any {other.metrics['p1']:.2f}")
    print(f"all: identical ranks {same_all}/{total}")


if __name__ == "__main__":
    main()
