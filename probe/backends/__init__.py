"""Backends: a frozen LM behind one scoring interface, one class per model kind or family.

- base.py     `Backend` (the interface and the prefix-tuning hooks) and the registry;
- masked.py   any masked LM, causal.py any causal LM, through the plain transformers forward;
- llama.py    the Llama family: its own forward, shared starts run once, packed weights;
- loading.py  `load_backend`: aliases, .gguf files, hub ids and folders, then the registry's choice;
              `model_info`: a model's kind and tokenizer without its weights (what a driver needs).

To add a model family with its own fast path, add a module here with a subclass of `MaskedLM` or
`CausalLM`, decorated with `@register`, whose `supports(config)` names the configs it serves. Every module
in this package is imported, and the most specific backend that supports a model's config is used.
"""

import importlib
import pkgutil

from probe.backends.base import BACKENDS, Backend, Prompt, PromptInputs, backend_class, generic_backend, register
from probe.backends.loading import (
    DTYPES,
    ModelInfo,
    cache_dir,
    gguf_cache_folder,
    load_backend,
    model_info,
    model_kind,
    resolve_model,
    smollm2_gguf,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BACKENDS", "DTYPES", "Backend", "Prompt", "PromptInputs", "backend_class", "generic_backend", "cache_dir",
           "gguf_cache_folder",
           "load_backend", "ModelInfo", "model_info", "model_kind", "register", "resolve_model", "smollm2_gguf"]
