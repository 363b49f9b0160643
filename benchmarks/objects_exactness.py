"""--objects any against the single-token evaluator: on facts whose object is one token, with the candidates
restricted to the single-token candidate set, the two must give the same ranks.

    python benchmarks/objects_exactness.py --relations P19,P36,P103 [--model smollm2] [--dtype bfloat16]

Prints, per relation, the facts compared, how many ranks and top-10 lists are identical, and P@1 of each path. Both
run through `probe.evaluate` on the test split: the single-token path on the `common` vocabulary, the other with
`objects="any"` and a candidates file of the same single-token words.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relations", default="P19,P36,P103")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    ids = args.relations.split(",")
    model = probe.load_model(args.model, device="cpu", dtype=args.dtype)
    single = probe.single_tokens(model, probe.load_data(args.data).vocab("common"))
    with tempfile.TemporaryDirectory(prefix="objects-exactness-") as tmp:
        words = Path(tmp) / "candidates.txt"  # each a sequence of one token
        words.write_text("".join(f"{w}\n" for w in single), encoding="utf-8")
        one = probe.evaluate(model, ids, data=args.data, split="test", vocab="common", predictions=True)
        other = probe.evaluate(model, ids, data=args.data, split="test", objects="any", candidates=words,
                               predictions=True)
    p1 = {name: res.relations.set_index("relation")["p1"] for name, res in (("single", one), ("any", other))}
    same_all = total = 0
    for rid in ids:
        a = {(r["sub"], r["obj"]): r for r in one.predictions[rid].to_dict("records")}
        b = {(r["sub"], r["obj"]): r for r in other.predictions[rid].to_dict("records")}
        if set(a) != set(b):
            raise SystemExit(f"error: {rid}: the two paths kept different facts ({len(a)} and {len(b)})")
        same = sum(a[k]["rank"] == b[k]["rank"] for k in a)
        same_top = sum(list(a[k]["top10"]) == list(b[k]["top10"]) for k in a)
        same_all, total = same_all + same, total + len(a)
        print(f"{rid}: {len(a)} facts, {len(single)} candidates; identical ranks {same}/{len(a)}, identical top-10 "
              f"{same_top}/{len(a)}; P@1 single {p1['single'][rid]:.2f}, any {p1['any'][rid]:.2f}")
    print(f"all: identical ranks {same_all}/{total}")


if __name__ == "__main__":
    main()
