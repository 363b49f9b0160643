"""Trained prompts as files: what evaluation uses (virtual embeddings, or per-layer prefix keys and values) in one
safetensors file per relation (`RUN/P19/prompt.safetensors`), and reading them back exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from probe.data import relation_key
from probe.errors import RunFolderError
from probe.methods import FixedPrompt, PromptMethod


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def prompt_bytes(method: PromptMethod) -> bytes:
    """What evaluation uses (virtual embeddings, or per-layer prefix keys and values), in one safetensors file.

    The method's own weights are added unless it folds them away (prefix-tuning keeps only the MLP's output).
    """

    def plain(t):
        return t.detach().float().cpu().clone().contiguous()

    with torch.no_grad():
        tensors = {}
        embeddings, kv = method.virtual_embeddings(), method.prefix()
        if embeddings is not None:
            tensors["virtual_embeddings"] = plain(embeddings)
        if kv is not None:
            tensors["prefix_keys"], tensors["prefix_values"] = plain(kv[0]), plain(kv[1])
    if method.save_state:
        tensors.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in method.state_dict().items()})
    return save(tensors)


def load_prompt(path) -> FixedPrompt:
    """A FixedPrompt from a saved prompt file; a damaged file is a ProbeError."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RunFolderError(f"{path}: not a readable prompt file ({e})") from None
    embeddings, keys, values = (tensors.get(k) for k in ("virtual_embeddings", "prefix_keys", "prefix_values"))
    if embeddings is None and keys is None:
        raise RunFolderError(f"{path}: not a prompt file (expected 'virtual_embeddings' or 'prefix_keys')")
    if embeddings is not None and (embeddings.ndim != 2 or not embeddings.is_floating_point()):
        raise RunFolderError(f"{path}: expected a 2-D float tensor 'virtual_embeddings', got shape {tuple(embeddings.shape)}")
    if keys is not None and (values is None or keys.ndim != 3 or values.ndim != 3 or keys.shape[:2] != values.shape[:2]):
        raise RunFolderError(f"{path}: expected 'prefix_keys' and 'prefix_values' of shape (layers, n_virtual, dim)")
    return FixedPrompt(embeddings, keys, values)


def saved_relations(run_dir: Path) -> list[str]:
    """The relations of a training run folder with a finished, saved prompt, in the folder's order."""
    found = [p.parent.name for p in Path(run_dir).glob("*/metrics.json") if (p.parent / "prompt.safetensors").is_file()]
    return sorted(found, key=relation_key)
