"""A training run's finished relations (also while it runs): macro P@1 of the trained prompt and of the manual prompt,
and both by the gold object's token count (runs made with --objects any).

    python benchmarks/by_length.py runs/ptuning-any-s13
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pooled_breakdown(rows: list[dict], key: str = "by_length") -> dict[str, dict]:
    """The relations' `key` breakdowns (metrics.json: facts and P@1 per token count) pooled: micro P@1 per bucket."""
    pooled: dict[str, dict] = {}
    for row in rows:
        for bucket, b in (row.get(key) or {}).items():
            acc = pooled.setdefault(bucket, {"facts": 0, "hits": 0.0})
            acc["facts"] += b["facts"]
            acc["hits"] += b["p1"] * b["facts"] / 100
    return {b: {"facts": a["facts"], "p1": 100 * a["hits"] / a["facts"] if a["facts"] else 0.0}
            for b, a in sorted(pooled.items())}


def main(run: str) -> None:
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(run).glob("*/metrics.json"))]
    if not rows:
        sys.exit(f"error: {run} has no finished relation (no */metrics.json)")
    n = len(rows)
    print(f"{n} relations, {sum(r['n_facts'] for r in rows):,} test facts")
    print(f"macro P@1: trained {sum(r['p1'] for r in rows) / n:.2f}, manual {sum(r['manual_p1'] for r in rows) / n:.2f}")
    trained, manual = pooled_breakdown(rows), pooled_breakdown(rows, "manual_by_length")
    for bucket, b in trained.items():
        print(f"  {bucket} token(s): {b['facts']:,} facts, micro P@1 trained {b['p1']:.2f}, manual {manual[bucket]['p1']:.2f}")
    print(f"flagged fit_failed: {', '.join(r['relation'] for r in rows if r.get('fit_failed')) or 'none'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/by_length.py RUN")
    main(sys.argv[1])
