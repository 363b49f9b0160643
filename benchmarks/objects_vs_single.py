"""An --objects any run against a single-token run of the same model, on the facts both keep.

    python benchmarks/objects_vs_single.py runs/manual-single runs/manual-any

Prints the facts both keep and, on them, macro and micro P@1 of each run; then the any run on all its facts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def predictions(run: Path) -> dict[str, dict[tuple[str, str], int]]:
    """rank of each (sub, obj) per relation, from a run folder's predictions.jsonl files."""
    out = {}
    for path in sorted(run.glob("*/predictions.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out[path.parent.name] = {(r["sub"], r["obj"]): r["rank"] for r in rows}
    return out


def p1(ranks: list[int]) -> float:
    return 100 * sum(r == 1 for r in ranks) / len(ranks)


def main(single_run: str, any_run: str) -> None:
    single, anylen = predictions(Path(single_run)), predictions(Path(any_run))
    per_relation = []
    for rid in sorted(set(single) & set(anylen)):
        common = sorted(set(single[rid]) & set(anylen[rid]))
        if common:
            per_relation.append(([single[rid][k] for k in common], [anylen[rid][k] for k in common]))
    facts = sum(len(a) for a, _ in per_relation)
    print(f"{len(per_relation)} relations, {facts} facts kept by both "
          f"(single-token run {sum(map(len, single.values()))}, any run {sum(map(len, anylen.values()))})")
    for name, i in (("single", 0), ("any", 1)):
        macro = sum(p1(r[i]) for r in per_relation) / len(per_relation)
        micro = p1([x for r in per_relation for x in r[i]])
        print(f"  {name:6} on the common facts: macro P@1 {macro:.2f}, micro P@1 {micro:.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/objects_vs_single.py SINGLE_RUN ANY_RUN")
    main(sys.argv[1], sys.argv[2])
