"""Prefix-tuning (Li & Liang 2021): trained keys and values for the virtual positions at every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from probe.errors import TemplateError
from probe.methods.base import MethodConfig, option
from probe.methods.gradient import GradientPrompt
from probe.methods.prompt_tuning import INIT_HELP, INITS, init_token_ids
from probe.templates import DEFAULT_SHAPES

REPARAMS = ("mlp", "none")


@dataclass
class PrefixTuningConfig(MethodConfig):
    reparam: str = option("mlp", REPARAMS, "mlp: the prefix is start + MLP(small embedding), as Li & Liang; none: the "
                                           "prefix itself is trained")
    init: str = option("vocab", INITS, INIT_HELP + " (their keys and values)")
    embed_dim: int = 512  # width of the small per-position embedding fed to the MLP
    mlp_hidden: int = 512


class PrefixTuning(GradientPrompt):
    """Per-layer keys and values for each virtual position, optionally through an MLP reparameterisation.

    The virtual positions keep a placeholder token as input; at every layer their keys and values are
    replaced by the prefix, so the rest of the input attends to the trained activations. With `reparam='mlp'`
    the prefix is `start + MLP(embedding)` (n_virtual x embed_dim -> mlp_hidden -> layers*(key_dim+value_dim));
    only its output is saved, so a run folder holds the per-layer prefixes alone.
    """

    name = "prefix-tuning"
    summary = "trained keys and values of the virtual positions at every layer (Li & Liang 2021)"
    config_class = PrefixTuningConfig
    default_lr = 1e-3
    beside_others = False  # its prefix goes in through hooks on the LM's layers, which a fit beside it would see
    save_state = False  # the MLP is folded away: prefix() is what is saved and reloaded
    # The prefix first, as Li & Liang. A causal LM reads its prediction at the last input token, whose own
    # hidden state a prefix does not set, so that token must be real: here the subject's last token.
    default_shapes = {**DEFAULT_SHAPES, "causal": "(6, sub, obj)"}

    def __init__(self, n_virtual: int, hidden_size: int, config: PrefixTuningConfig | None = None,
                 layout: tuple[int, int, int] = (1, 1, 1), start: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size, config)
        self.config.check()
        self.layout = layout
        layers, key_dim, value_dim = layout
        width = layers * (key_dim + value_dim)
        start = torch.zeros(n_virtual, width) if start is None else start.float().reshape(n_virtual, width)
        if self.config.reparam == "mlp":
            self.register_buffer("start", start.clone())
            self.embedding = nn.Parameter(torch.randn(n_virtual, self.config.embed_dim))
            self.mlp = nn.Sequential(
                nn.Linear(self.config.embed_dim, self.config.mlp_hidden), nn.Tanh(), nn.Linear(self.config.mlp_hidden, width)
            )
            if self.config.init != "random":  # start exactly at the real words' activations
                nn.init.zeros_(self.mlp[2].weight)
                nn.init.zeros_(self.mlp[2].bias)
        else:
            self.flat = nn.Parameter(start.clone())

    @classmethod
    def check_template(cls, compiled) -> None:
        super().check_template(compiled)
        probe_input = compiled.encode("x")
        if probe_input.target in probe_input.virtual_positions:
            raise TemplateError(
                f"template {compiled.template.source!r}: prefix-tuning needs a real token at the target position, "
                "but it is a virtual token (a prefix sets keys and values, not the prediction); "
                "end the virtual tokens before the subject or the text before obj, e.g. (6, sub, obj)"
            )

    @classmethod
    def create(cls, backend, compiled, manual_template: str, config: PrefixTuningConfig | None = None) -> PrefixTuning:
        config = config or PrefixTuningConfig()
        config.check()
        cls.check_template(compiled)
        layout = backend.kv_layout()
        n = compiled.n_virtual
        if config.init == "random":
            start = None
            if config.reparam == "none":  # noise at the scale of each channel of real activations
                sample = torch.randint(min(5000, len(backend.tokenizer)), (1, 64))
                std = _flat_kv(*backend.token_kv(sample))[0].std(dim=0)
                start = torch.randn(n, std.shape[0]) * std
        else:
            ids = init_token_ids(backend.tokenizer, len(backend.tokenizer), n, config.init, manual_template,
                                 compiled.start_ids)
            start = _flat_kv(*backend.token_kv(ids[None]))[0]
        return cls(n, backend.hidden_size, config, layout=layout, start=start)

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        layers, key_dim, value_dim = self.layout
        flat = self.start + self.mlp(self.embedding) if self.config.reparam == "mlp" else self.flat
        kv = flat.view(self.n_virtual, layers, key_dim + value_dim).transpose(0, 1)
        return kv[..., :key_dim], kv[..., key_dim:]

    def saved_info(self, compiled) -> dict:
        layers, key_dim, value_dim = self.layout
        return {"prefix_layout": {"layers": layers, "key_dim": key_dim, "value_dim": value_dim}}


def _flat_kv(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(layers, B, L, dk) and (layers, B, L, dv) -> (B, L, layers*(dk+dv)), the layout PrefixTuning trains."""
    kv = torch.cat([keys, values], dim=-1).float().cpu()  # (layers, B, L, dk+dv)
    return kv.permute(1, 2, 0, 3).reshape(kv.shape[1], kv.shape[2], -1)
