"""A finished training run: macro P@1 of the trained prompt and of the manual prompt, and both by the gold object's
token count (runs made with --objects any; the run's results.json pools them as `by_length` and `by_length_manual`).

    python benchmarks/by_length.py runs/ptuning-any-s13
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: str) -> None:
    path = Path(run) / "results.json"
    if not path.is_file():
        sys.exit(f"error: {run} is not a finished run (no results.json)")
    results = json.loads(path.read_text(encoding="utf-8"))
    rows = results["relations"]
    n = len(rows)
    print(f"{n} relations, {sum(r['n_facts'] for r in rows):,} test facts")
    print(f"macro P@1: trained {sum(r['p1'] for r in rows) / n:.2f}, manual {sum(r['manual_p1'] for r in rows) / n:.2f}")
    trained, manual = results.get("by_length", {}), results.get("by_length_manual", {})
    for bucket, b in trained.items():
        print(f"  {bucket} token(s): {b['facts']:,} facts, micro P@1 trained {b['p1']:.2f}, manual {manual[bucket]['p1']:.2f}")
    print(f"flagged fit_failed: {', '.join(r['relation'] for r in rows if r.get('fit_failed')) or 'none'}")

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/by_length.py RUN")
    main(sys.argv[1])
