"""lm-pub-quiz's own time for all of BEAR, from a sample: its `Evaluator.evaluate_relation` on every relation with
`subsample=N` (its own sampler, `random_state=23`), all templates, timed relation by relation; each relation's time is
scaled by its instances over N, and the sum set against a probe run folder's wall time on the whole of BEAR.

    python benchmarks/bear_lpq_time.py --model DIR --probe-run RUN [--subsample 1] [--batch-size 1] [--relations all]

DIR is a Hugging Face folder (SmolLM2 as probe converts it: ~/.cache/probe/models/SmolLM2-*), loaded here in float32
by transformers, not by probe. RUN is `probe eval --data ../shared/bear --all --dtype float32 --out RUN`, with its
wall time in seconds given by `--probe-seconds` (the run's own `seconds` in results.json where it has one).
lm-pub-quiz scores each statement as its own row, so its time grows with the statements: the scaling is linear in
them. Prints the sampled statements and seconds per relation, the scaled total and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face causal LM folder")
    parser.add_argument("--data", default="../shared/bear/BEAR")
    parser.add_argument("--subsample", type=int, default=1, help="instances per relation (lm-pub-quiz's subsample)")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-pub-quiz's batch_size (its default: 1)")
    parser.add_argument("--relations", default="all", help="all, or relation ids separated by commas")
    parser.add_argument("--probe-run", type=Path, default=None, help="probe's run folder on all of BEAR")
    parser.add_argument("--probe-seconds", type=float, default=None, help="probe's wall time for that run")
    args = parser.parse_args()
    from lm_pub_quiz import Dataset, Evaluator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    evaluator = Evaluator.from_model(model=model, tokenizer=tokenizer, model_type="CLM", device="cpu")
    dataset = Dataset.from_path(args.data)
    wanted = None if args.relations == "all" else set(args.relations.split(","))
    evaluator.evaluate_instance(template="[X] is [Y].", answers=["a", "b"], subject="x", reduction="sum")  # warm-up
    sampled = scaled = statements_all = 0.0
    n_sampled = 0
    print("relation  instances  answers  templates  sampled statements  seconds  statements/s")
    for relation in dataset:
        if wanted is not None and relation.relation_code not in wanted:
            continue
        instances, answers = len(relation.instance_table), len(relation.answer_space)
        templates = len(relation.templates)
        n = min(args.subsample, instances)
        t0 = time.perf_counter()
        evaluator.evaluate_relation(relation, subsample=n, batch_size=args.batch_size, reduction="sum",
                                    metric="accuracy", create_instance_table=False)
        seconds = time.perf_counter() - t0
        k = n * answers * templates
        sampled += seconds
        n_sampled += k
        scaled += seconds * instances / n
        statements_all += instances * answers * templates
        print(f"{relation.relation_code:8}  {instances:9}  {answers:7}  {templates:9}  {k:18}  {seconds:7.1f}  "
              f"{k / seconds:12.1f}")
    print(f"\nlm-pub-quiz, batch_size {args.batch_size}: {n_sampled:,} statements sampled in {sampled:.1f} s "
          f"({n_sampled / sampled:.2f} statements/s); scaled to all {statements_all:,.0f} statements: "
          f"{scaled:,.0f} s ({scaled / 3600:.2f} h)")
    if args.probe_run is not None:
        results = json.loads((args.probe_run / "results.json").read_text())
        seconds = args.probe_seconds or results.get("seconds")
        if seconds:
            print(f"probe ({args.probe_run}): {seconds:,.1f} s for the same {statements_all:,.0f} statements: "
                  f"lm-pub-quiz / probe = {scaled / seconds:.1f}x")


if __name__ == "__main__":
    main()
