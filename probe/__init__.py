"""probe: what facts does a frozen language model know? Manual, discrete and continuous prompts on LAMA.

The Python API (probe/api.py), loaded on first use so that `import probe` stays light:
`load_model`, `evaluate`, `train`, `load_prompt`, `compare`, `score_statements`, and the errors: `ProbeError` and its
kinds `DataError`, `TemplateError`, `ModelError`, `SettingError`, `RunFolderError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probe.errors import DataError, ModelError, ProbeError, RunFolderError, SettingError, TemplateError

__version__ = "0.1.0"
API = ("Model", "Results", "TrainedPrompt", "compare", "evaluate", "load_model", "load_prompt", "score_statements",
       "train")

if TYPE_CHECKING:
    from probe.api import Model, Results, TrainedPrompt, compare, evaluate, load_model, load_prompt, score_statements, train


def __getattr__(name: str):
    if name in API:
        from probe import api

        return getattr(api, name)
    raise AttributeError(f"module 'probe' has no attribute {name!r}")


__all__ = ["DataError", "Model", "ModelError", "ProbeError", "Results", "RunFolderError", "SettingError", "TemplateError",
           "TrainedPrompt", "__version__", "compare", "evaluate", "load_model", "load_prompt", "score_statements",
           "train"]
