"""What a learned prompt means: the nearest vocabulary tokens of each virtual vector (cosine similarity)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from probe.backends import load_backend
from probe.errors import RunFolderError, SettingError
from probe.files import atomic_write_json, read_json
from probe.methods import METHODS
from probe.options import reopen_data
from probe.saved_prompts import load_prompt, saved_relations


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
    """Only training runs of continuous methods have vectors to explain; eval runs and discrete searches hold real tokens."""
    method = config.get("method")
    if config.get("command") != "train" or method not in METHODS or not METHODS[method].continuous:
        readable = ", ".join(n for n, c in METHODS.items() if c.continuous)
        what = ("learns the LM's weights, no prompt vectors" if method in METHODS and METHODS[method].trains_lm
                else "its prompt is real tokens")
        raise RunFolderError(f"{run_dir} is a run of the method {method!r}: {what}, nothing to explain (explain reads runs of "
                             f"{readable})")


def explain_run(run_dir: Path, relations: list[str] | None, k: int, data: str | None, log=print) -> Path:
    """Explain every saved prompt of a training run (or only `relations`): print each, save RUN/explain.json."""
    if k < 1:
        raise SettingError(f"-k must be at least 1, got {k}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (expected {run_dir / 'config.json'})")
    cfg = read_json(run_dir / "config.json")
    check_explainable(cfg, run_dir)
    lama = reopen_data(cfg, data)
    ids = [r for r in saved_relations(run_dir) if not relations or r in relations]
    if not ids:
        raise RunFolderError(f"{run_dir} holds no saved prompts{' for ' + ', '.join(relations) if relations else ''}")
    backend = load_backend(cfg["model"], dtype="float32")
    tables: dict[str, torch.Tensor] = {}
    report = {}
    for rid in ids:
        rel = lama.relation(rid)
        gold = {f.obj for split in ("train", "dev") for f in lama.facts(rel.id, split)}
        words = set(rel.template.replace("[X]", " ").replace("[Y]", " ").split())
        vectors, space = load_vectors(run_dir / rid)
        if space not in tables:
            tables[space] = vocabulary_table(backend, space)
            if space != INPUT_SPACE:
                log(f"note: {cfg.get('method')} learns no input vectors; comparing the {space} of each virtual "
                    "token with those of every vocabulary token on its own")
        info = {"space": space, **explain_vectors(backend.tokenizer, tables[space], vectors, k, gold, words)}
        report[rel.id] = info
        log(describe(rel, info))
    path = run_dir / "explain.json"
    atomic_write_json(path, {"k": k, "relations": report})
    return path


def describe(relation, info: dict) -> str:
    """One relation's explanation as printed: a line per virtual token, then what its neighbours are."""
    lines = [f"{relation.id} {relation.label} (manual: {relation.template})"]
    for slot in info["slots"]:
        shown = ", ".join(f"{t} {s:.2f}" for t, s in zip(slot["tokens"], slot["similarity"], strict=True))
        lines.append(f"  v{slot['slot']}: {shown}")
    lines.append(f"  {info['slots_sharing_nearest']} of {len(info['slots'])} virtual tokens share their nearest token; "
                 f"{info['distinct_neighbours']} distinct neighbours; gold objects among them: "
                 f"{', '.join(info['gold_neighbours']) or 'none'}; template words: "
                 f"{', '.join(info['template_neighbours']) or 'none'}")
    return "\n".join(lines)
