"""A training run's prompts exported as PEFT adapters (`probe export RUN --to peft --out ADAPTERS`), scored through
PeftModel's own forward pass: the same P@1 and MRR as probe's, and how far the candidates' logits are apart.

    python benchmarks/peft_exactness.py RUN ADAPTERS [--split test_34k]

Prints, per relation, the facts, probe's saved P@1 and MRR, PEFT's, and the largest |logit difference| over the
facts and candidates (probe's scores recomputed with the saved prompt, in the run's dtype: `TrainedPrompt.logits`).
Needs probe[peft]; a run on a data folder with single-token candidates.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("adapters", type=Path)
    args = parser.parse_args()
    cfg = json.loads((args.run / "config.json").read_text())
    source = cfg.get("data_spec") or {"data": cfg["data"]}
    if source.get("facts") or cfg.get("objects") == "any":
        raise SystemExit(f"error: {args.run}: expected a run on a data folder with single-token candidates")
    model = probe.load_model(cfg["model"], device="cpu", dtype=cfg.get("dtype", "float32"))
    data = probe.load_data(source.get("data"))
    words = probe.single_tokens(model, data.vocab(cfg["vocab"]))  # word -> token id, the run's candidates
    columns, index = torch.tensor(list(words.values())), {w: i for i, w in enumerate(words)}
    for folder in sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file()):
        adapter = json.loads((folder / "adapter_config.json").read_text())
        meta = json.loads((folder / "probe_prompt.json").read_text())
        rid = meta["relation"]
        rel_cfg = json.loads((args.run / rid / "config.json").read_text())
        saved = json.loads((args.run / rid / "metrics.json").read_text())
        facts = [(s, o) for s, o in data.facts(rid, rel_cfg["split"]) if o in words]
        # batched by length as probe evaluates; a subject has one input
        ours = probe.load_prompt(args.run / rid).logits(model, facts, candidates=list(words), batch_size=128)
        tok = AutoTokenizer.from_pretrained(adapter["base_model_name_or_path"])
        base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"], dtype=model.hf_model.dtype)
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
        t0, rows = time.time(), []
        with torch.no_grad():  # right-padded batches of 64 inputs
            for start in range(0, len(facts), 64):
                encoded = [tok(meta["input_template"].replace("[X]", sub),
                               add_special_tokens=meta["add_special_tokens"]).input_ids for sub, _ in facts[start:start + 64]]
                width = max(map(len, encoded))
                ids = torch.tensor([e + [tok.pad_token_id or 0] * (width - len(e)) for e in encoded])
                mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
                logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, -width:]  # prompt tuning adds rows
                last = torch.tensor([len(e) - 1 for e in encoded])
                rows.append(logits[torch.arange(len(encoded)), last][:, columns].float())
        theirs = torch.cat(rows)
        gold = torch.tensor([index[obj] for _, obj in facts])
        ranks = ((theirs > theirs.gather(1, gold[:, None])).sum(dim=1) + 1).double()  # ties in the gold's favour
        peft = {"p1": 100 * float((ranks <= 1).float().mean()), "mrr": float((1.0 / ranks).mean())}
        print(f"{rid} {adapter['peft_type']} ({adapter['num_virtual_tokens']} virtual tokens): {len(facts)} facts; "
              f"probe P@1 {saved['p1']:.4f} MRR {saved['mrr']:.6f}; PEFT P@1 {peft['p1']:.4f} MRR {peft['mrr']:.6f}; "
              f"max |logit difference| {(theirs - ours).abs().max().item():.2e} (logits up to "
              f"{ours.abs().max().item():.1f}); PEFT scoring {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
