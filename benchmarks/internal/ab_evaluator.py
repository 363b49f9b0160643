"""Two versions of probe's evaluator taking turns relation by relation in one process (manual prompts, all 41).

The other version is a copy of an older probe package renamed `probe_old` on PYTHONPATH, e.g.:

    git worktree add /tmp/before c00c0e1 && mkdir /tmp/oldpkg && cp -r /tmp/before/probe /tmp/oldpkg/probe_old
    sed -i 's/\\bfrom probe\\./from probe_old./g; s/\\bfrom probe import/from probe_old import/g' \\
        /tmp/oldpkg/probe_old/*.py /tmp/oldpkg/probe_old/*/*.py
    PYTHONPATH=/tmp/oldpkg python benchmarks/internal/ab_evaluator.py

Both load the same model; the turns alternate which goes first, so drift in this VM's speed reaches both alike.
"""

from __future__ import annotations

import argparse
import time

import probe_old.backends
import probe_old.evaluate
import probe_old.methods
import probe_old.templates
import probe_old.vocab

from probe.backends import load_backend
from probe.batching import relation_facts
from probe.data import LamaData
from probe.evaluator import evaluate_facts
from probe.methods.manual import ManualPrompt
from probe.templates import compile_template
from probe.vocab import build_candidates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--relations", nargs="*", default=None, help="default: all")
    ap.add_argument("--old-first", action="store_true", help="load the old version's model first")
    args = ap.parse_args()
    data = LamaData(args.data)
    if args.old_first:
        old = probe_old.backends.load_backend(args.model, dtype="bfloat16")
    new = load_backend(args.model, dtype="bfloat16")
    if not args.old_first:
        old = probe_old.backends.load_backend(args.model, dtype="bfloat16")
    cands_new = build_candidates(new.tokenizer, data.vocab_words("common"))
    cands_old = probe_old.vocab.build_candidates(old.tokenizer, data.vocab_words("common"))
    manual_new = ManualPrompt(0, new.hidden_size)
    manual_old = probe_old.methods.get_method("manual")(0, old.hidden_size)
    seconds = {"old": 0.0, "new": 0.0}
    same = 0
    ids = args.relations or list(data.relations)
    for i, rid in enumerate(ids):
        rel = data.relation(rid)
        facts, _ = relation_facts(data, rel, "test_34k", cands_new, False)
        ranks = {}
        for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
            t = time.perf_counter()
            if side == "new":
                compiled = compile_template(rel.template, new.tokenizer, new.kind)
                ranks[side] = evaluate_facts(new, manual_new, compiled, facts, cands_new).ranks
            else:
                compiled = probe_old.templates.compile_template(rel.template, old.tokenizer, old.kind)
                ranks[side] = probe_old.evaluate.evaluate_facts(old, manual_old, compiled, facts, cands_old).ranks
            seconds[side] += time.perf_counter() - t
        same += ranks["old"] == ranks["new"]
    n = sum(len(relation_facts(data, data.relation(r), "test_34k", cands_new, False)[0]) for r in ids)
    for side in ("old", "new"):
        print(f"{side}: {n} facts in {seconds[side]:.1f}s = {n / seconds[side]:.1f} facts/s")
    print(f"new/old time {seconds['new'] / seconds['old']:.3f}; relations with identical ranks: {same} of {len(ids)}")


if __name__ == "__main__":
    main()
