"""Save a causal LM with only its first N layers (the final norm and output layer kept): a second model to probe.

    python benchmarks/truncate_model.py smollm2 15 runs/models/smollm2-15l
    probe eval --all --model smollm2 --model runs/models/smollm2-15l --out runs/two-models

Which layers hold a fact is a question of its own; here it gives a real second model without a download.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import probe


def main(model: str, layers: int, out: str) -> None:
    path = probe.model_folder(model)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    total = lm.config.num_hidden_layers
    if not 1 <= layers <= total:
        sys.exit(f"error: {model} has {total} layers; keep between 1 and {total}")
    lm.model.layers = lm.model.layers[:layers]
    lm.config.num_hidden_layers = layers
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:layers]
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    print(f"{out}: the first {layers} of {total} layers of {model}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python benchmarks/truncate_model.py MODEL N_LAYERS OUT")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
