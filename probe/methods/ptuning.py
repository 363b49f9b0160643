"""P-tuning (Liu et al. 2021): virtual-token embeddings -> 2-layer biLSTM -> MLP, trained against a frozen LM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from probe.methods.base import MethodConfig
from probe.methods.gradient import GradientPrompt


@dataclass
class PTuningConfig(MethodConfig):
    lstm: bool = True  # fixed by the method (ptuning-mlp has none), recorded in the run config; not a user option


class PTuningEncoder(GradientPrompt):
    """A learned embedding per virtual token, a biLSTM (H/2 per direction) over them, then MLP H->H->H."""

    name = "ptuning"
    summary = "P-tuning (Liu et al. 2021): an embedding per virtual token -> 2-layer biLSTM -> MLP"
    config_class = PTuningConfig

    def __init__(self, n_virtual: int, hidden_size: int, config: PTuningConfig | None = None):
        super().__init__(n_virtual, hidden_size, config)
        h = hidden_size
        self.embedding = nn.Embedding(n_virtual, h)
        self.lstm = (
            nn.LSTM(h, h // 2, num_layers=2, bidirectional=True, batch_first=True) if self.config.lstm else None
        )
        lstm_out = 2 * (h // 2) if self.lstm is not None else h
        self.mlp = nn.Sequential(nn.Linear(lstm_out, h), nn.ReLU(), nn.Linear(h, h))

    def virtual_embeddings(self) -> torch.Tensor:
        x = self.embedding.weight[None]
        if self.lstm is not None:
            x = self.lstm(x)[0]
        return self.mlp(x)[0]


class PTuningMLP(PTuningEncoder):
    """P-tuning without the LSTM: embedding -> MLP."""

    name = "ptuning-mlp"
    summary = "P-tuning without the LSTM: an embedding per virtual token -> MLP"

    def __init__(self, n_virtual: int, hidden_size: int, config: PTuningConfig | None = None):
        super().__init__(n_virtual, hidden_size, PTuningConfig(lstm=False))
