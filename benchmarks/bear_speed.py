"""BEAR statement scoring: probe's (`probe.score_statements`) against lm-pub-quiz's own `Evaluator`, back to back on
the same model, instances and templates; also checks that every answer's log-likelihood agrees.

    python benchmarks/bear_speed.py --relations P1376 --instances 4 [--templates 0,1] [--model smollm2] [--dtype float32]

Prints, per relation, the statements scored, seconds for each side, the largest difference in log-likelihood and
whether each instance's predicted answer is the same. lm-pub-quiz runs with its defaults (`reduction="sum"`,
`batch_size` as given, default 1). Both score two statements once before the clock starts (probe packs its
weights for oneDNN on first use).
"""

from __future__ import annotations

import argparse
import time

import torch

import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relations", default="P1376")
    parser.add_argument("--instances", type=int, default=4, help="the first N instances of each relation")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data", default="../shared/bear")
    parser.add_argument("--lpq-batch-size", type=int, default=1)
    parser.add_argument("--templates", default=None, help="template indices to run, e.g. 0,1 (default: all)")
    args = parser.parse_args()
    from lm_pub_quiz import Evaluator

    model = probe.load_model(args.model, device="cpu", dtype=args.dtype)
    evaluator = Evaluator.from_model(model=model.hf_model, tokenizer=model.tokenizer,
                                     model_type="CLM" if model.kind == "causal" else "MLM", device="cpu")
    data = probe.load_data(args.data)
    warm = data.relation(args.relations.split(",")[0])  # once each before timing: probe packs its weights on first use
    probe.score_statements(model, warm.templates[0], ["x"], list(warm.answers[:2]))
    evaluator.evaluate_instance(template=warm.templates[0], answers=list(warm.answers[:2]), subject="x", reduction="sum")
    totals = [0.0, 0.0, 0]
    for rid in args.relations.split(","):
        rel = data.relation(rid)
        subjects = [s for s, _ in data.facts(rid)][: args.instances]
        answers = list(rel.answers)
        templates = [rel.templates[int(i)] for i in args.templates.split(",")] if args.templates else rel.templates
        t0 = time.perf_counter()
        ours = [probe.score_statements(model, t, subjects, answers) for t in templates]
        t1 = time.perf_counter()
        ref = [torch.tensor([evaluator.evaluate_instance(template=t, answers=answers, subject=s, reduction="sum",
                                                         batch_size=args.lpq_batch_size) for s in subjects],
                            dtype=torch.float64) for t in templates]
        t2 = time.perf_counter()
        diff = max((a - b).abs().max().item() for a, b in zip(ours, ref, strict=True))
        same = all(torch.equal(a.argmax(dim=1), b.argmax(dim=1)) for a, b in zip(ours, ref, strict=True))
        n = len(subjects) * len(answers) * len(templates)
        totals[0] += t1 - t0
        totals[1] += t2 - t1
        totals[2] += n
        print(f"{rid}: {n:,} statements; probe {t1 - t0:.1f} s, lm-pub-quiz {t2 - t1:.1f} s "
              f"({(t2 - t1) / (t1 - t0):.1f}x); max |diff| {diff:.2e}; same top-1: {same}", flush=True)
    print(f"all: {totals[2]:,} statements; probe {totals[0]:.1f} s ({totals[2] / totals[0]:.1f}/s), lm-pub-quiz "
          f"{totals[1]:.1f} s ({totals[2] / totals[1]:.1f}/s): {totals[1] / totals[0]:.1f}x")


if __name__ == "__main__":
    main()
