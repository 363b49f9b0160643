"""Facts per second of manual-prompt evaluation: a straightforward loop against `probe.evaluate`.

The straightforward loop (plain transformers): batch 64, float32, the template's text filled with each subject, a
full forward with logits at every position over the whole vocabulary, then the rank of the gold object among the
candidates. probe: `probe.evaluate` on the relation (the dtype asked for, batches sorted by length, logits only at the
target and only for candidate rows), its per-call setup (the candidates for the tokenizer) included. The two take
turns relation by relation, so that drift in the machine's speed hits both alike.

    python benchmarks/eval_speed.py --relations P19 P20 P27 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

import probe


@torch.no_grad()
def straightforward_ranks(model: probe.Model, template: str, facts: list[tuple[str, str]], words: dict[str, int],
                          batch_size: int = 64) -> list[int]:
    """Unsorted right-padded batches, full-vocabulary logits at every position, then the target and the candidates."""
    tok = model.tokenizer
    causal = model.kind == "causal"
    text = template.split("[Y]")[0].rstrip() if causal else template.replace("[Y]", tok.mask_token)
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) if t is not None), 0)
    columns, index = torch.tensor(list(words.values())), {w: i for i, w in enumerate(words)}
    ranks = []
    for i in range(0, len(facts), batch_size):
        chunk = facts[i : i + batch_size]
        encoded = [tok(text.replace("[X]", sub)).input_ids for sub, _ in chunk]
        width = max(map(len, encoded))
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
        target = torch.tensor([len(e) - 1 if causal else e.index(tok.mask_token_id) for e in encoded])
        logits = model.hf_model(input_ids=ids, attention_mask=mask).logits
        scores = logits[torch.arange(len(chunk)), target][:, columns].float()
        gold = scores[torch.arange(len(chunk)), torch.tensor([index[obj] for _, obj in chunk])]
        ranks.extend(((scores > gold[:, None]).sum(dim=1) + 1).tolist())  # ties count in the gold's favour
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--relations", nargs="*", default=None, help="default: all")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()

    data = probe.load_data(args.data)
    ids = args.relations or data.relations
    base = probe.load_model(args.model, device="cpu", dtype="float32") if not args.skip_baseline else None
    fast = probe.load_model(args.model, device="cpu", dtype=args.dtype)
    words = probe.single_tokens(fast, data.vocab("common"))
    work = [(rid, data.relation(rid).template, [f for f in data.facts(rid, "test_34k") if f[1] in words])
            for rid in ids]
    n = sum(len(f) for *_, f in work)

    # Relation by relation, probe and then the straightforward loop, so that both see the same machine: this VM's
    # speed drifts by 10-20 % within minutes.
    fast_s = base_s = 0.0
    fast_hits = base_hits = 0
    for rid, template, facts in tqdm(work, desc="relations"):
        t = time.perf_counter()
        res = probe.evaluate(fast, [rid], data=args.data, split="test_34k", vocab="common", batch_size=args.batch_size,
                             predictions=True)
        fast_s += time.perf_counter() - t
        assert res.n_facts == len(facts), (rid, res.n_facts, len(facts))
        fast_hits += int((res.predictions[rid]["rank"] == 1).sum())
        if base is not None:
            t = time.perf_counter()
            base_hits += sum(r == 1 for r in straightforward_ranks(base, template, facts, words))
            base_s += time.perf_counter() - t
    print(f"probe evaluator ({args.dtype}, batch {args.batch_size}): {n} facts in {fast_s:.1f}s = "
          f"{n / fast_s:.1f} facts/s, micro P@1 {100 * fast_hits / n:.2f}")
    if base is None:
        return
    print(f"straightforward (float32, batch 64, all logits): {n} facts in {base_s:.1f}s = "
          f"{n / base_s:.1f} facts/s, micro P@1 {100 * base_hits / n:.2f}")
    print(f"speed-up {base_s / fast_s:.2f}x")


if __name__ == "__main__":
    main()
