"""Share of padding in the evaluator's batches of manual prompts: real tokens against padded batch cells.

    PROBE_DATA=../shared/lama python benchmarks/internal/padding.py --model smollm2
"""

from __future__ import annotations

import argparse

from probe.backends import load_backend
from probe.batching import filter_facts, make_batches
from probe.data import LamaData
from probe.evaluator import by_input
from probe.templates import compile_template
from probe.vocab import build_candidates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

    data = LamaData(args.data)
    backend = load_backend(args.model)
    candidates = build_candidates(backend.tokenizer, data.vocab_words("common"))
    real = cells = 0
    for rid, rel in data.relations.items():
        facts, _ = filter_facts(data.facts(rid, "test_34k"), candidates)
        compiled = compile_template(rel.template, backend.tokenizer, backend.kind)
        subjects = [group[0] for group in by_input(compiled, facts).values()]  # the evaluator runs each subject once
        for batch in make_batches(compiled, subjects, candidates, args.batch_size, backend.pad_id):
            cells += batch.input_ids.numel()
            real += int(batch.attention_mask.sum())
    print(f"{real:,} real tokens in {cells:,} batch cells: {100 * (1 - real / cells):.1f} % padding")


if __name__ == "__main__":
    main()
