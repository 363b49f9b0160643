"""probe: what facts does a frozen language model know? Manual, discrete and continuous prompts on LAMA.

The Python API (probe/api.py), loaded on first use so that `import probe` stays light:
`load_model`, `evaluate`, `train`, `load_prompt`, `compare`, `score_statements`, `load_data`, `single_tokens`,
`model_folder`, and the errors: `ProbeError` and its kinds `DataError`, `TemplateError`, `ModelError`,
`SettingError`, `RunFolderError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probe.errors import DataError, ModelError, ProbeError, RunFolderError, SettingError, TemplateError

__version__ = "0.1.0"
API = ("Data", "Model", "Relation", "Results", "TrainedPrompt", "compare", "evaluate", "load_data", "load_model",
       "load_prompt", "model_folder", "score_statements", "single_tokens", "train")

if TYPE_CHECKING:
    from probe.api import (
        Data,
        Model,
        Relation,
        Results,
        TrainedPrompt,
        compare,
        evaluate,
        load_data,
        load_model,
        load_prompt,
        model_folder,
        score_statements,
        single_tokens,
        train,
    )


def __getattr__(name: str):
    if name in API:
        from probe import api

        return getattr(api, name)
    raise AttributeError(f"module 'probe' has no attribute {name!r}")


__all__ = ["Data", "DataError", "Model", "ModelError", "ProbeError", "Relation", "Results", "RunFolderError",
           "SettingError", "TemplateError", "TrainedPrompt", "__version__", "compare", "evaluate", "load_data", "load_model",
           "load_prompt", "model_folder", "score_statements", "single_tokens", "train"]
