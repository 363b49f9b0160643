"""PEFT prompt adapters, out and in.

`probe export RUN --to peft` writes a training run's prompts as PEFT adapter folders (prompt-tuning, P-tuning and
AutoPrompt as PROMPT_TUNING, prefix-tuning as PREFIX_TUNING), and `probe eval --prompts DIR` evaluates PEFT prompt
adapters (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) with probe's candidates and metrics.

PEFT puts its virtual tokens before the whole input. A probe template has an equivalent when all its virtual tokens
come before the first real token. The special tokens the tokenizer puts first (a BOS) become the adapter's first
virtual tokens, as their embeddings or their keys and values, so the adapter's input is fed without special tokens.
probe keeps a prefix's keys as the key projection outputs them; PEFT keeps them as the model's cache holds them,
after any rotary position encoding. Both ways are computed by the model's own forward pass, not by a formula.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from probe.backends import Backend, load_backend
from probe.backends.loading import is_hub_id, resolve_model
from probe.batching import relation_facts
from probe.cells import torch_threads
from probe.errors import DataError, ModelError, ProbeError, RunFolderError, TemplateError, check_positive
from probe.evaluator import evaluate_facts
from probe.files import atomic_write_bytes, atomic_write_json, read_json
from probe.methods import FixedPrompt, get_method
from probe.options import Options, candidate_choice, check_templates, check_threads, load_data, model_names, relation_ids
from probe.runs import check_own_folder
from probe.saved_prompts import load_prompt, saved_relations
from probe.templates import (
    OBJ,
    SUB,
    TEXT,
    VIRTUAL,
    WORDS,
    CompiledTemplate,
    Part,
    Template,
    compile_template,
    expand_manual,
    parse_template,
    shape_source,
)

ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROBE_PROMPT = "adapter_config.json", "adapter_model.safetensors", "probe_prompt.json"
MARKER = "probe_export.json"  # in an --out folder: probe wrote it, so it may write there again (over its own files)
READ_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
PEFT_EVAL_FLAGS = {"prompts", "model", "relation", "all", "split", "vocab", "batch_size", "device", "dtype", "threads",
                   "template", "data", "facts", "fields", "objects", "candidates", "length_norm", "allow_download"}


# -- templates: virtual tokens first, then the text PEFT's input encodes --------------------------------------------


def real_parts(template: Template, where: str) -> tuple[Part, ...]:
    """The parts after a template's leading virtual tokens; a template with a virtual token after a real one (or
    with none) has no PEFT equivalent: a ProbeError."""
    parts = template.parts
    k = next((i for i, p in enumerate(parts) if p.kind not in (VIRTUAL, WORDS)), len(parts))
    if k == 0 or any(p.kind in (VIRTUAL, WORDS) for p in parts[k:]):
        raise TemplateError(f"{where}: template {template.source!r} has virtual tokens after real ones, and PEFT puts "
                            "every virtual token before the input; train with the virtual tokens first, e.g. (10, sub, obj)")
    return parts[k:]


def input_text(parts: tuple[Part, ...], space_sensitive: bool) -> str:
    """The text the real parts encode, [X] for the subject, up to the object: ` [X] was born in`. A space is written
    where probe encodes one (BPE vocabularies), and between words otherwise."""
    text = ""
    for p in parts:
        if p.kind == OBJ:
            break
        space = " " if p.space and (space_sensitive or text) else ""
        text += space + ("[X]" if p.kind == SUB else p.text)
    return text


def input_parts(text: str, where: str) -> tuple[Part, ...]:
    """The parts of an input template (`probe_prompt.json`'s, or `[X] was born in [Y] .`); a leading space is kept."""
    source = text if "[Y]" in text else text.rstrip() + " [Y]"
    try:
        parts = list(parse_template(source.strip()).parts)
    except ProbeError as e:
        raise TemplateError(f"{where}: {e}") from None
    if any(p.kind not in (SUB, TEXT, OBJ) for p in parts):
        raise TemplateError(f"{where}: input template {text!r} must be text with [X] (and [Y] where the object goes)")
    parts[0] = replace(parts[0], space=source[:1].isspace())
    return tuple(parts)


def peft_template(n_virtual: int, parts: tuple[Part, ...], tokenizer, add_special_tokens: bool) -> CompiledTemplate:
    """A compiled causal template that places `n_virtual` tokens first, as PEFT does, then the special tokens the
    tokenizer puts first (if the input is fed with them), then the real parts."""
    template = Template(shape_source((Part(VIRTUAL, n_virtual), *parts)), (Part(VIRTUAL, n_virtual), *parts))
    compiled = compile_template(template, tokenizer, "causal")
    body = list(compiled.parts)
    if add_special_tokens and compiled.lead_ids:
        body.insert(1, (TEXT, list(compiled.lead_ids)))
    return replace(compiled, lead_ids=[], parts=body)


# -- keys and values as the model's cache holds them ----------------------------------------------------------------


@torch.no_grad()
def cached_kv(backend: Backend, ids: list[int], virtual: list[int],
              prefix: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (layers, L, kv_dim) in the model's cache after it reads `ids`, the `virtual` positions' keys
    and values set by probe's prefix (as its key and value projections output them)."""
    input_ids = torch.tensor([ids], device=backend.device)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[0, virtual] = True
    with backend.prefix_tuning(prefix, mask):
        out = backend.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    cache = next(v for k, v in out.items() if k in ("cache", "past_key_values"))

    def flat(t: torch.Tensor) -> torch.Tensor:  # (1, heads, L, head_dim) -> (L, heads * head_dim)
        return t[0].transpose(0, 1).reshape(t.shape[2], -1).float().cpu()

    return (torch.stack([flat(layer.keys) for layer in cache.layers]),
            torch.stack([flat(layer.values) for layer in cache.layers]))


def kv_heads(backend: Backend) -> tuple[int, int]:
    """(key/value heads, head dim) of the model's attention."""
    config = backend.model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return kv, getattr(config, "head_dim", None) or backend.hidden_size // heads


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    eps = 8 * torch.finfo(dtype).eps
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=eps, atol=eps * float(b.abs().max().clamp(min=1))))


def projection_kv(backend: Backend, keys: torch.Tensor, values: torch.Tensor,
                  where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's prefix (the cache's keys and values at positions 0..n-1) as probe's (what the key projection outputs
    there): the same keys where the model encodes no position in them; else the keys turned back through the rotary
    encoding the model applies, its cos and sin read from the model itself. The result is checked by running it."""
    n = keys.shape[1]
    ids, virtual = [backend.pad_id] * n, list(range(n))
    got, got_values = cached_kv(backend, ids, virtual, (keys, values))
    if not _close(got_values, values, backend.dtype):
        raise ModelError(f"{where}: the model changes the values a prefix sets; probe cannot evaluate this adapter")
    if _close(got, keys, backend.dtype):
        return keys, values
    heads, head_dim = kv_heads(backend)
    half = head_dim // 2
    unit = torch.zeros(heads, head_dim)
    unit[:, :half] = 1  # a rotary encoding turns (1, 0) into (cos, sin) in each pair of channels
    turned, _ = cached_kv(backend, ids, virtual, (unit.reshape(-1).expand_as(keys), values))
    turned = turned.view(*keys.shape[:2], heads, head_dim)
    cos, sin = turned[..., :half], turned[..., half:]
    k = keys.view(*keys.shape[:2], heads, head_dim)
    a, b = k[..., :half], k[..., half:]
    norm = cos * cos + sin * sin
    back = torch.cat([(a * cos + b * sin) / norm, (b * cos - a * sin) / norm], dim=-1).reshape(keys.shape)
    again, _ = cached_kv(backend, ids, virtual, (back, values))
    if not _close(again, keys, backend.dtype):
        raise ModelError(f"{where}: probe cannot map this model's cached keys back to its key projections (model type "
                         f"{backend.model.config.model_type!r}: a position encoding other than rotary halves)")
    return back, values


# -- export -----------------------------------------------------------------------------------------------------------


def check_export_folder(out: Path) -> None:
    """--out: a new or empty folder, or one probe exported into before (it writes over its own files only)."""
    check_own_folder(out, MARKER)


def base_model_path(model: str) -> str:
    """What `from_pretrained` loads for a run's model: a hub id, or a folder (the converted one for `smollm2` and a
    .gguf file), as an absolute path."""
    path = resolve_model(model)
    return str(Path(path).resolve()) if Path(path).exists() else path


def export_peft(run_dir: Path, out: Path, relations: list[str] | None = None, log=print) -> list[Path]:
    """Write each saved prompt of a training run as a PEFT adapter folder `out/<relation>/`; every check runs before
    the model loads and anything is written. Returns the folders written."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.json").is_file():
        raise RunFolderError(f"{run_dir} is not a run folder of `probe train` (no config.json)")
    cfg = read_json(run_dir / "config.json")
    if cfg.get("command") != "train":
        raise RunFolderError(f"{run_dir} is not a training run folder (its config.json says command {cfg.get('command')!r})")
    method = get_method(cfg.get("method", "ptuning"))
    if cfg.get("model_kind") != "causal":
        raise RunFolderError(f"{run_dir} was trained on a {cfg.get('model_kind')} LM: PEFT has no task type that predicts a "
                             "masked token, so only causal-LM prompts export")
    if method.trains_lm:
        raise RunFolderError(f"{run_dir} was trained with method {method.name!r}, which trains the LM itself: there is no "
                             "prompt to export")
    if cfg.get("control", "none") != "none":
        raise RunFolderError(f"{run_dir} was trained under --control {cfg['control']}: its model is no base model that "
                             "from_pretrained loads")
    saved = saved_relations(run_dir)
    missing = [r for r in relations or [] if r not in saved]
    if missing:
        raise RunFolderError(f"{run_dir} has no saved prompt for {', '.join(missing)} (it has {', '.join(saved) or 'none'})")
    chosen = []
    for rid in [r for r in saved if not relations or r in relations]:
        rel_cfg = read_json(run_dir / rid / "config.json")
        if rel_cfg.get("kept") == "manual":
            log(f"warning: {rid} kept the manual prompt (--fallback manual): no trained prompt to export; skipped")
            continue
        template = expand_manual(parse_template(rel_cfg["template"]), rel_cfg.get("manual_template"))
        chosen.append((rid, rel_cfg, real_parts(template, f"{run_dir / rid}")))
    if not chosen:
        raise RunFolderError(f"{run_dir} holds no trained prompt to export")
    check_export_folder(out)
    base = base_model_path(cfg["model"])
    backend = load_backend(cfg["model"], device="cpu", dtype="float32")
    written = [write_adapter(backend, run_dir / rid, out / rid, rel_cfg, parts, cfg["model"], base)
               for rid, rel_cfg, parts in chosen]
    marker = read_json(out / MARKER) if (out / MARKER).is_file() else {}
    atomic_write_json(out / MARKER, {"written_by": "probe export --to peft", "run": str(run_dir.resolve()),
                                     "relations": sorted({*marker.get("relations", []), *(p.name for p in written)})})
    return written


def write_adapter(backend: Backend, folder: Path, out: Path, rel_cfg: dict, parts: tuple[Part, ...], model: str,
                  base: str) -> Path:
    """One relation's prompt as a PEFT adapter folder, with probe_prompt.json beside it."""
    tok = backend.tokenizer
    compiled = compile_template(rel_cfg["template"], tok, "causal", manual=rel_cfg.get("manual_template"))
    prompt = load_prompt(folder / "prompt.safetensors")
    if prompt.n_virtual != compiled.n_virtual:
        raise RunFolderError(f"{folder}: {prompt.n_virtual} saved vectors for {compiled.n_virtual} virtual slots")
    lead, n = list(compiled.lead_ids), compiled.n_virtual
    config = backend.model.config
    fields = {"task_type": "CAUSAL_LM", "num_virtual_tokens": len(lead) + n, "num_transformer_submodules": 1,
              "num_layers": config.num_hidden_layers, "base_model_name_or_path": base, "inference_mode": True,
              "revision": None, "auto_mapping": None, "modules_to_save": None}
    if prompt.keys is not None:
        heads, head_dim = kv_heads(backend)
        if prompt.keys.shape[-1] != heads * head_dim or prompt.values.shape[-1] != heads * head_dim:
            raise RunFolderError(f"{folder}: keys of width {prompt.keys.shape[-1]} for {heads} key/value heads of "
                                 f"{head_dim}: PEFT's prefix layout does not fit this model")
        keys, values = cached_kv(backend, lead + [compiled.placeholder_id] * n, list(range(len(lead), len(lead) + n)),
                                 (prompt.keys, prompt.values))
        tensor = torch.stack([keys, values], dim=1).permute(2, 0, 1, 3).reshape(keys.shape[1], -1)  # [k0 v0 k1 v1 ...]
        fields.update(peft_type="PREFIX_TUNING", token_dim=heads * head_dim, num_attention_heads=heads,
                      prefix_projection=False, encoder_hidden_size=heads * head_dim)
    else:
        with torch.no_grad():
            special = backend.embed(torch.tensor(lead, dtype=torch.long)).float().cpu()
        tensor = torch.cat([special, prompt.embeddings.float().cpu()])
        fields.update(peft_type="PROMPT_TUNING", token_dim=backend.hidden_size,
                      num_attention_heads=config.num_attention_heads, prompt_tuning_init="RANDOM",
                      prompt_tuning_init_text=None, tokenizer_name_or_path=None, tokenizer_kwargs=None)
    atomic_write_bytes(out / ADAPTER_WEIGHTS, save({"prompt_embeddings": tensor.contiguous()}))
    atomic_write_json(out / ADAPTER_CONFIG, dict(sorted(fields.items())))
    atomic_write_json(out / PROBE_PROMPT, {
        "relation": rel_cfg["relation"], "input_template": input_text(parts, compiled.space_sensitive),
        "add_special_tokens": False, "base_model": model, "probe_template": rel_cfg["template"],
        "method": rel_cfg.get("method"), "special_virtual_tokens": len(lead),
        "object": "the next token after the input (its candidates are probe's)"})
    return out


# -- import -----------------------------------------------------------------------------------------------------------


def is_peft_folder(path: Path) -> bool:
    """A PEFT adapter folder, or a folder of them."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() or (path.is_dir() and any((c / ADAPTER_CONFIG).is_file()
                                                                          for c in path.iterdir()))


@dataclass
class Adapter:
    """A PEFT prompt adapter as read: its folder, config, tensor, and what probe_prompt.json says beside it."""

    folder: Path
    config: dict
    tensor: torch.Tensor
    meta: dict
    relation: str | None = None

    @property
    def base(self) -> str | None:
        return self.meta.get("base_model") or self.config.get("base_model_name_or_path")


def read_adapter(folder: Path) -> Adapter:
    """One adapter folder, checked: a causal-LM prompt adapter of a supported type with its tensor."""
    config = read_json(folder / ADAPTER_CONFIG)
    kind = config.get("peft_type")
    if kind not in READ_TYPES:
        raise RunFolderError(f"{folder}: a {kind} adapter; probe evaluates prompt adapters ({', '.join(READ_TYPES)})")
    if config.get("task_type") != "CAUSAL_LM" or config.get("num_transformer_submodules") not in (None, 1):
        raise RunFolderError(f"{folder}: task type {config.get('task_type')}; probe evaluates CAUSAL_LM adapters")
    try:
        tensor = load_file(str(folder / ADAPTER_WEIGHTS)).get("prompt_embeddings")
    except (SafetensorError, OSError) as e:
        raise RunFolderError(f"{folder}: expected a readable {ADAPTER_WEIGHTS} ({e})") from None
    n, dim = config.get("num_virtual_tokens"), config.get("token_dim")
    width = dim * (2 * config.get("num_layers", 0) if kind == "PREFIX_TUNING" else 1) if dim else None
    if tensor is None or tuple(tensor.shape) != (n, width):
        shape = None if tensor is None else tuple(tensor.shape)
        raise RunFolderError(f"{folder}: expected a tensor 'prompt_embeddings' of shape ({n}, {width}), found {shape}")
    meta = read_json(folder / PROBE_PROMPT) if (folder / PROBE_PROMPT).is_file() else {}
    return Adapter(folder, config, tensor.float(), meta, meta.get("relation"))


def read_adapters(path: Path) -> list[Adapter]:
    """An adapter folder, or a folder of them (one per relation, named after it unless probe_prompt.json says)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return [read_adapter(path)]
    adapters = [read_adapter(c) for c in sorted(path.iterdir()) if (c / ADAPTER_CONFIG).is_file()]
    for a in adapters:
        a.relation = a.relation or a.folder.name
    return adapters


def same_model(model: str, adapter: Adapter) -> bool:
    """Whether `--model` names the adapter's base model: its probe name, or the hub id or folder it was made on."""
    if model in (adapter.meta.get("base_model"), adapter.config.get("base_model_name_or_path")):
        return True
    base = adapter.config.get("base_model_name_or_path")
    return base is not None and Path(base).exists() and base_model_path(model) == str(Path(base).resolve())


def fit_adapter(backend: Backend, adapter: Adapter) -> FixedPrompt:
    """The adapter as probe's prompt on this model; an adapter made for other dimensions is a ProbeError."""
    c, model = adapter.config, backend.name
    layers = backend.model.config.num_hidden_layers
    if c["peft_type"] != "PREFIX_TUNING":
        if c["token_dim"] != backend.hidden_size:
            raise ModelError(f"{adapter.folder}: made for a model of hidden size {c['token_dim']}; {model!r} has "
                             f"{backend.hidden_size}: another base model")
        return FixedPrompt(adapter.tensor)
    heads, head_dim = kv_heads(backend)
    if (c["num_layers"], c["token_dim"], c.get("num_attention_heads")) != (layers, heads * head_dim, heads):
        raise ModelError(f"{adapter.folder}: made for {c['num_layers']} layers of {c.get('num_attention_heads')} "
                         f"key/value heads ({c['token_dim']} wide); {model!r} has {layers} of {heads} "
                         f"({heads * head_dim}): another base model")
    kv = adapter.tensor.view(c["num_virtual_tokens"], layers, 2, c["token_dim"]).transpose(0, 1)
    keys, values = projection_kv(backend, kv[:, :, 0].contiguous(), kv[:, :, 1].contiguous(), str(adapter.folder))
    return FixedPrompt(None, keys, values)


def eval_peft(opts: Options, log=print) -> list[dict]:
    """`probe eval --prompts DIR` on PEFT adapters: each evaluated on its relation's facts of --split with probe's
    candidates and metrics, its virtual tokens first. Rows: relation, type, facts, P@1, P@10, MRR."""
    opts.refuse(PEFT_EVAL_FLAGS, "`probe eval --prompts` with PEFT adapters")
    batch_size = 128 if opts.batch_size is None else opts.batch_size
    check_positive(batch_size=batch_size)
    check_threads(opts.threads)
    adapters = read_adapters(opts.prompts)
    data = load_data(opts, opts.template)
    asked = relation_ids(data, opts.relation, opts.all) if opts.relation or opts.all else None
    if len(adapters) == 1 and (adapters[0].relation is None or (asked and len(asked) == 1)):  # -r names its relation
        if not asked or len(asked) != 1:
            raise DataError(f"{adapters[0].folder}: no {PROBE_PROMPT} says its relation: give it with --relation")
        adapters[0].relation = asked[0]
    for a in adapters:
        if a.relation not in data.relations:
            raise DataError(f"{a.folder} is for relation {a.relation!r}, which {data.name} does not hold "
                            f"(a folder of adapters names each after its relation, or its {PROBE_PROMPT} does)")
    adapters = [a for a in adapters if asked is None or a.relation in asked]
    if not adapters:
        raise RunFolderError(f"{opts.prompts} has no adapter for {', '.join(asked or [])}")
    model = model_names(opts, several=False)[0] if opts.model else None
    for a in adapters:
        if model is not None and not same_model(model, a):
            raise ModelError(f"{a.folder} was made for base model {a.base!r}, not {model!r}")
    if model is None:
        bases = sorted({str(a.base) for a in adapters})
        if len(bases) != 1 or bases[0] == "None":
            raise ModelError(f"{opts.prompts}: adapters of base models {', '.join(bases)}: give the one to use with --model")
        model = bases[0]
        if is_hub_id(model) and not opts.allow_download:  # a folder from elsewhere is data, not orders
            raise ModelError(f"{opts.prompts} names the hub model {model!r} as its base, which is not on this machine: "
                             f"pass --model {model} (or --allow-download) to load it from the hub")
    if opts.template is None:
        check_templates(data, [a.relation for a in adapters if "input_template" not in a.meta], "--template")
    choice = candidate_choice(opts)
    split = data.split_name(opts.split)
    backend = load_backend(model, device=opts.device or "auto", dtype=opts.dtype or "bfloat16")
    if backend.kind != "causal":
        raise ModelError(f"model {model!r} is a {backend.kind} LM: PEFT prompt adapters here are for causal LMs")
    candidates = choice.build(backend.tokenizer, data)
    rows = []
    for a in adapters:
        relation = data.relation(a.relation)
        text = relation.template if opts.template is not None else a.meta.get("input_template", relation.template)
        parts = input_parts(text, str(a.folder))
        compiled = peft_template(a.config["num_virtual_tokens"], parts, backend.tokenizer,
                                 bool(a.meta.get("add_special_tokens", True)))
        prompt = fit_adapter(backend, a).to(backend.device)
        facts, dropped = relation_facts(data, relation, split, candidates, bool(opts.relation))
        with torch_threads(opts.threads if backend.device.type == "cpu" else None):
            result = evaluate_facts(backend, prompt, compiled, facts, candidates.for_relation(relation.id), batch_size)
        rows.append({"relation": relation.id, "type": relation.type, "adapter": a.folder.name,
                     "peft_type": a.config["peft_type"], "n_facts": len(facts), "n_dropped": dropped,
                     **{k: result.metrics[k] for k in ("p1", "p10", "mrr")}})
    log(f"{backend.name}: {len(rows)} PEFT adapter(s) on {split}, {choice.vocab} candidates, virtual tokens first")
    return rows


def describe(rows: list[dict]) -> str:
    """The table `probe eval --prompts` prints for PEFT adapters, with the macro means."""
    import pandas as pd

    df = pd.DataFrame(rows)[["relation", "type", "peft_type", "n_facts", "p1", "p10", "mrr"]]
    macro = {k: sum(r[k] for r in rows) / len(rows) for k in ("p1", "p10", "mrr")}
    return (df.to_string(index=False, float_format=lambda v: f"{v:.3f}")
            + f"\n\nmacro over {len(rows)} relation(s): P@1 {macro['p1']:.2f}, P@10 {macro['p10']:.2f}, "
              f"MRR {macro['mrr']:.3f}  (P@k in %, MRR as a fraction)")


__all__ = ["describe", "eval_peft", "export_peft", "is_peft_folder"]
