"""transformers' own float32 noise through PEFT: one prompt-tuning adapter, the same facts, scored in batches of
different sizes. The largest |logit difference| between two batchings is the floor below which no comparison of two
forward passes over the model can agree.

    python benchmarks/peft_noise.py [--model smollm2] [--relation P1376] [--facts 64]

Needs probe[peft]. The adapter is PEFT's own (`get_peft_model`, 10 virtual tokens, seed 0); the candidates are LAMA's
common vocabulary; the input is the subject alone.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import probe


def logits_after(model, tok, texts: list[str], token_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The candidates' logits after each text, right-padded batches of `batch`."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            encoded = [tok(t).input_ids for t in texts[start:start + batch]]
            width = max(map(len, encoded))
            ids = torch.tensor([e + [tok.pad_token_id or 0] * (width - len(e)) for e in encoded])
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:]
            last = torch.tensor([len(e) - 1 for e in encoded])
            rows.append(logits[torch.arange(len(encoded)), last][:, token_ids])
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--relation", default="P1376")
    parser.add_argument("--facts", type=int, default=64)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    folder = probe.model_folder(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=10)).eval()
    data = probe.load_data(args.data)
    candidates = probe.single_tokens(tok, data.vocab("common"))  # word -> token id
    texts = [s for s, o in data.facts(args.relation, "test_34k") if o in candidates][:args.facts]
    token_ids = torch.tensor(list(candidates.values()))
    t0 = time.time()
    by = {b: logits_after(model, tok, texts, token_ids, b) for b in (64, 7, 1)}
    print(f"{len(texts)} facts of {args.relation}, {len(candidates)} candidates, largest |logit| "
          f"{by[64].abs().max().item():.2f}, torch threads {torch.get_num_threads()}")
    for b in (7, 1):
        print(f"batch 64 against batch {b}: max |logit difference| {(by[64] - by[b]).abs().max().item():.3e}")
    print(f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
