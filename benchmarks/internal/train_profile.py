"""Where a relation's fit spends its time: training steps (forward, backward, optimizer) against dev evaluations.

    python benchmarks/internal/train_profile.py --relation P19 --steps 20 [--method ptuning] [--model smollm2] [--ops] [--fit]

Prints the mean seconds of each part of a step, of one dev evaluation, and with --ops the top torch operators;
with --fit, the seconds of a whole relation as `probe train` runs it: the fit (steps and dev evaluations), the
test evaluation, and the manual prompt's dev and test evaluations.
"""

from __future__ import annotations

import argparse
import time

import torch

from probe.backends import load_backend
from probe.batching import make_batches
from probe.data import open_data
from probe.evaluator import evaluate_facts
from probe.methods import get_method
from probe.templates import compile_template, parse_template
from probe.vocab import CandidateChoice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relation", default="P19")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--method", default="ptuning")
    parser.add_argument("--template", default="(3, sub, 3, obj)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators")
    parser.add_argument("--fit", action="store_true", help="also time a whole relation as probe train runs it")
    args = parser.parse_args()
    backend = load_backend(args.model, dtype=args.dtype)
    data = open_data(None)
    relation = data.relation(args.relation)
    candidates = CandidateChoice().build(backend.tokenizer, data).for_relation(relation.id)
    facts = [f for f in data.facts(relation.id, "train") if f.obj in candidates.index]
    dev = [f for f in data.facts(relation.id, "dev") if f.obj in candidates.index]
    compiled = compile_template(parse_template(args.template), backend.tokenizer, backend.kind, manual=relation.template)
    torch.manual_seed(13)
    method = get_method(args.method).create(backend, compiled, relation.template)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    batches = make_batches(compiled, facts, candidates, args.batch_size, backend.pad_id, torch.Generator().manual_seed(13))
    times = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step(batch) -> None:
        t0 = time.perf_counter()
        loss = backend.gold_loss(batch, method.prompt_inputs(), candidates).mean()
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        times["forward"] += t1 - t0
        times["backward"] += t2 - t1
        times["optimizer"] += t3 - t2

    step(batches[0])  # warm-up
    times = dict.fromkeys(times, 0.0)
    n = min(args.steps, len(batches) - 1)
    tokens = sum(b.input_ids.numel() for b in batches[1 : n + 1])
    for batch in batches[1 : n + 1]:
        step(batch)
    total = sum(times.values())
    print(f"{relation.id}: {len(facts)} train facts, {len(dev)} dev facts, {n} steps of {args.batch_size}, "
          f"{tokens / n:.0f} token positions a step")
    print(f"step: {total / n:.3f} s = " + ", ".join(f"{k} {v / n:.3f}" for k, v in times.items()))
    evaluate_facts(backend, method, compiled, dev, candidates)
    t0 = time.perf_counter()
    evaluate_facts(backend, method, compiled, dev, candidates)
    print(f"dev evaluation: {time.perf_counter() - t0:.3f} s")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[1 : min(6, len(batches))]:
                step(batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.fit:
        fit_times(backend, args, relation, compiled, facts, dev, candidates, data)


def fit_times(backend, args, relation, compiled, train, dev, candidates, data) -> None:
    """A relation's seconds as `probe train` spends them."""
    import probe.trainer as train_module
    from probe.fit import FitTask, fit
    from probe.methods.manual import ManualPrompt

    test = [f for f in data.facts(relation.id, "test") if f.obj in candidates.index]
    evals = []
    evaluate = evaluate_facts

    def timed_eval(*a, **k):
        t0 = time.perf_counter()
        out = evaluate(*a, **k)
        evals.append(time.perf_counter() - t0)
        return out

    train_module.evaluate_facts = timed_eval
    method_class = get_method(args.method)
    config = method_class.fit_config(batch_size=args.batch_size)
    task = FitTask(compiled, train, dev, candidates, config, method=method_class, options=method_class.config_class(),
                   manual_template=relation.template, relation=relation.id)
    t0 = time.perf_counter()
    fitted = fit(backend, task)
    method, result = fitted.prompt, fitted.result
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_facts(backend, method, compiled, test, candidates, 128)
    t_test = time.perf_counter() - t0
    manual = compile_template(relation.template, backend.tokenizer, backend.kind)
    t0 = time.perf_counter()
    for facts in (dev, test):
        evaluate_facts(backend, ManualPrompt(0, backend.hidden_size), manual, facts, candidates, 128)
    t_manual = time.perf_counter() - t0
    print(f"fit {t_fit:.1f} s ({result.steps} steps, {len(evals)} dev evaluations {sum(evals):.1f} s, "
          f"steps {t_fit - sum(evals):.1f} s), test {t_test:.1f} s ({len(test)} facts), manual dev and test {t_manual:.1f} s")


if __name__ == "__main__":
    main()
