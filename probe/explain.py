"""What a learned prompt means: the nearest vocabulary tokens of each virtual vector (cosine similarity)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from probe.errors import ProbeError


@dataclass
class SlotNeighbours:
    """The k nearest vocabulary tokens of one virtual vector."""

    slot: int
    tokens: list[str]
    ids: list[int]
    similarity: list[float]


def nearest_tokens(vectors: torch.Tensor, table: torch.Tensor, k: int, allowed: torch.Tensor | None = None):
    """Indices and cosine similarities (n, k) of the k rows of `table` nearest to each of `vectors` (n, H)."""
    sims = F.normalize(vectors.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    if allowed is not None:
        sims[:, ~allowed] = -torch.inf
    top = sims.topk(min(k, table.shape[0]), dim=-1)
    return top.indices, top.values


def word_ids(tokenizer, words: set[str]) -> set[int]:
    """Token ids that spell one of `words` on their own, with or without a leading space."""
    ids = set()
    for word in words:
        for text in (word, " " + word):
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    return ids


def explain_vectors(tokenizer, table: torch.Tensor, vectors: torch.Tensor, k: int, gold_objects: set[str],
                    template_words: set[str]) -> dict:
    """Neighbours per slot, how many slots share their nearest token, and which neighbours are gold or template words."""
    special = torch.zeros(table.shape[0], dtype=torch.bool)
    special[[i for i in tokenizer.all_special_ids if i < table.shape[0]]] = True
    idx, sims = nearest_tokens(vectors, table, k, ~special)
    slots = [
        SlotNeighbours(i, tokenizer.convert_ids_to_tokens(row.tolist()), row.tolist(), [round(s, 4) for s in sim.tolist()])
        for i, (row, sim) in enumerate(zip(idx, sims, strict=True))
    ]
    firsts = [s.ids[0] for s in slots]
    gold = word_ids(tokenizer, gold_objects)
    template = word_ids(tokenizer, template_words)
    every = [i for s in slots for i in s.ids]
    return {
        "slots": [s.__dict__ for s in slots],
        "slots_sharing_nearest": sum(c for c in Counter(firsts).values() if c > 1),
        "distinct_neighbours": len(set(every)),
        "gold_neighbours": sorted({tokenizer.convert_ids_to_tokens(i) for i in every if i in gold}),
        "template_neighbours": sorted({tokenizer.convert_ids_to_tokens(i) for i in every if i in template}),
        "mean_top1_similarity": round(sum(s.similarity[0] for s in slots) / max(1, len(slots)), 4),
    }


INPUT_SPACE = "input embeddings"
PREFIX_SPACE = "layer-0 keys and values"


def load_vectors(folder: Path) -> tuple[torch.Tensor, str]:
    """The vectors to explain from a relation folder of a trained run, and the space they live in.

    Input-level methods saved input embeddings. Prefix-tuning learns no input vectors, so its layer-0 keys
    and values are used, to be compared with each vocabulary token's own layer-0 keys and values.
    """
    from probe.pipeline import load_prompt

    prompt = load_prompt(folder / "prompt.safetensors")
    if prompt.embeddings is not None:
        return prompt.embeddings, INPUT_SPACE
    return torch.cat([prompt.keys[0], prompt.values[0]], dim=-1), PREFIX_SPACE


@torch.no_grad()
def vocabulary_table(backend, space: str, batch_size: int = 4096) -> torch.Tensor:
    """One row per vocabulary token in `space`: its input embedding, or its layer-0 keys and values on its own."""
    table = backend.model.get_input_embeddings().weight.detach()
    if space == INPUT_SPACE:
        return table
    rows = []
    for start in range(0, table.shape[0], batch_size):
        ids = torch.arange(start, min(start + batch_size, table.shape[0]))[:, None]
        keys, values = backend.token_kv(ids, layers=1)
        rows.append(torch.cat([keys[0, :, 0], values[0, :, 0]], dim=-1).cpu())
    return torch.cat(rows)


def check_explainable(config: dict, run_dir: Path) -> None:
    """Only training runs of continuous methods have vectors to explain; eval runs and AutoPrompt hold real tokens."""
    method = config.get("method")
    if config.get("command") != "train" or method == "autoprompt":
        raise ProbeError(f"{run_dir} is a run of the discrete method {method!r}: its prompt is real tokens, "
                         "nothing to explain (explain reads runs of ptuning, ptuning-mlp, prompt-tuning or prefix-tuning)")
