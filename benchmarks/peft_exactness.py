"""A training run's prompts exported as PEFT adapters (`probe export RUN --to peft --out ADAPTERS`), scored through
PeftModel's own forward pass: the same P@1 and MRR as probe's, and how far the candidates' logits are apart.

    python benchmarks/peft_exactness.py RUN ADAPTERS [--split test_34k]

Prints, per relation, the facts, probe's saved P@1 and MRR, PEFT's, and the largest |logit difference| over the
facts and candidates (probe's scores recomputed with the saved prompt, in the run's dtype). Needs probe[peft].
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from probe.backends import load_backend
from probe.batching import relation_facts
from probe.commands.rerun import run_candidates
from probe.evaluator import scored_batches
from probe.metrics import ranks_of, relation_metrics
from probe.options import reopen_data
from probe.saved_prompts import load_prompt
from probe.templates import compile_template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("adapters", type=Path)
    args = parser.parse_args()
    cfg = json.loads((args.run / "config.json").read_text())
    backend = load_backend(cfg["model"], dtype=cfg.get("dtype", "float32"))
    data = reopen_data(cfg)
    candidates = run_candidates(cfg).build(backend.tokenizer, data)
    for folder in sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file()):
        adapter = json.loads((folder / "adapter_config.json").read_text())
        meta = json.loads((folder / "probe_prompt.json").read_text())
        rid = meta["relation"]
        rel_cfg = json.loads((args.run / rid / "config.json").read_text())
        saved = json.loads((args.run / rid / "metrics.json").read_text())
        facts, _ = relation_facts(data, data.relation(rid), rel_cfg["split"], candidates, True)
        cands = candidates.for_relation(rid)
        compiled = compile_template(rel_cfg["template"], backend.tokenizer, "causal", manual=rel_cfg["manual_template"])
        prompt = load_prompt(args.run / rid / "prompt.safetensors").prompt_inputs()
        with torch.no_grad():  # batched by length as probe evaluates; a subject has one input
            scored = {f.sub: row for batch, scores in scored_batches(backend, prompt, compiled, facts, cands, 128)
                      for f, row in zip(batch.facts, scores, strict=True)}
        ours = torch.stack([scored[f.sub] for f in facts])
        tok = AutoTokenizer.from_pretrained(adapter["base_model_name_or_path"])
        base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"], dtype=backend.dtype)
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        t0, rows = time.time(), []
        with torch.no_grad():  # right-padded batches of 64 inputs
            for start in range(0, len(facts), 64):
                encoded = [tok(meta["input_template"].replace("[X]", f.sub),
                               add_special_tokens=meta["add_special_tokens"]).input_ids for f in facts[start:start + 64]]
                width = max(map(len, encoded))
                ids = torch.tensor([e + [tok.pad_token_id or 0] * (width - len(e)) for e in encoded])
                mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
                logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:]  # prompt tuning adds rows
                last = torch.tensor([len(e) - 1 for e in encoded])
                rows.append(logits[torch.arange(len(encoded)), last][:, cands.token_ids].float())
        theirs = torch.cat(rows)
        gold = torch.tensor([cands.index[f.obj] for f in facts])
        peft = relation_metrics(ranks_of(theirs, gold).tolist())
        print(f"{rid} {adapter['peft_type']} ({adapter['num_virtual_tokens']} virtual tokens): {len(facts)} facts; "
              f"probe P@1 {saved['p1']:.4f} MRR {saved['mrr']:.6f}; PEFT P@1 {peft['p1']:.4f} MRR {peft['mrr']:.6f}; "
              f"max |logit difference| {(theirs - ours).abs().max().item():.2e} (logits up to "
              f"{ours.abs().max().item():.1f}); PEFT scoring {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
