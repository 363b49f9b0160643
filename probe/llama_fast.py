"""A faster forward to the target position for Llama-architecture causal LMs (SmolLM2, Llama).

The same arithmetic as transformers' Llama, written out in plain tensors over the model's own weights:
- attention as two batched matmuls with a causal mask (on CPU, faster than SDPA for inputs of ~10 tokens);
- no attention mask for padding: rows are right-padded, and a causal model never looks right;
- in the last layer only the target row of each input goes through attention, output projection and MLP;
- on CPU without autograd, the weights packed once for oneDNN (`probe.packed`, bit-identical in bfloat16);
- a start that rows share (a template's leading words or virtual tokens, then a subject's first token) can
  be run once (`prefix_kv`) and its keys and values handed to the rows that continue it (`past`).
`LMBackend` uses it when `supports(config)` holds, else the transformers forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from probe.packed import PackedLinear


def supports(config) -> bool:
    """Whether `LlamaTarget` computes exactly what transformers computes for this config."""
    return (
        config.model_type == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with the same roundings, without building rotate_half(x)."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


class Past(NamedTuple):
    """Keys and values (1 or B, kv, P, d) per layer of a start that rows continue: one for all, or one per row."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> Past:
        """The starts of `rows` (indices into this past's batch), in that order."""
        return Past([k[rows] for k in self.keys], [v[rows] for v in self.values])


class LlamaTarget:
    """Final hidden state (after the last norm) at one target position per row of right-padded inputs."""

    def __init__(self, model):
        body = model.base_model
        cfg = model.config
        self.body = body
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.linear = PackedLinear()

    def _norm(self, x: torch.Tensor, norm) -> torch.Tensor:
        """LlamaRMSNorm's arithmetic: float32, then the weight in the input dtype (F.rms_norm in bfloat16 rounds differently)."""
        h = F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    def _linear(self, module, x: torch.Tensor) -> torch.Tensor:
        """module(x); through its packed weight unless hooks watch the module (prefix-tuning sets keys and values so)."""
        if module._forward_hooks or module._forward_pre_hooks:
            return module(x)
        return self.linear(x, module.weight)

    def _attend(self, q, k, v, mask, scale) -> torch.Tensor:
        """q (B, kv, rep*Lq, d), k and v (B, kv, L, d), additive float mask broadcast to (B, 1, 1, Lq, L)."""
        B, n_kv, _, d = q.shape
        scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
        scores = scores.view(B, n_kv, self.n_heads // n_kv, -1, k.shape[2])
        scores = scores * scale + mask
        probs = (scores - scores.amax(dim=-1, keepdim=True)).exp()  # softmax: over ~10 keys, 4x faster than .softmax
        probs = (probs / probs.sum(dim=-1, keepdim=True)).to(q.dtype).view(B, n_kv, -1, k.shape[2])
        return probs @ v  # (B, kv, rep*Lq, d)

    def __call__(self, inputs_embeds: torch.Tensor, target: torch.Tensor, past: Past | None = None) -> torch.Tensor:
        """Hidden states (B, H) at `target` of inputs (B, L, H) that continue `past` (one start for all, or one per row)."""
        return self._run(inputs_embeds, target, past)

    def prefix_kv(self, inputs_embeds: torch.Tensor, past: Past | None = None) -> Past:
        """Keys and values at every layer of starts (B, P, H) that continue `past`, with `past`'s in front."""
        return self._run(inputs_embeds, None, past)

    def _run(self, x: torch.Tensor, target: torch.Tensor | None, past: Past | None):
        B, L, _ = x.shape
        rep, d = self.n_heads // self.n_kv, self.head_dim
        P = past.length if past is not None else 0
        positions = torch.arange(P, P + L, device=x.device)
        cos, sin = self.body.rotary_emb(x, positions[None])
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, L, d)
        causal = torch.full((L, P + L), float("-inf"), device=x.device).triu(P + 1)
        rows = torch.arange(B, device=x.device)
        layers = self.body.layers[: self.body.config.num_hidden_layers]
        kept = Past([], [])
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm)
            k = _rotate(self._linear(attn.k_proj, h).view(B, L, self.n_kv, d).transpose(1, 2), cos, sin)
            v = self._linear(attn.v_proj, h).view(B, L, self.n_kv, d).transpose(1, 2)
            if past is not None:
                k = torch.cat([past.keys[i].expand(B, -1, -1, -1), k], dim=2)
                v = torch.cat([past.values[i].expand(B, -1, -1, -1), v], dim=2)
            if target is None:  # a start: only its keys and values are wanted
                kept.keys.append(k)
                kept.values.append(v)
                if i == len(layers) - 1:
                    return kept
            if i < len(layers) - 1:
                q = _rotate(self._linear(attn.q_proj, h).view(B, L, self.n_heads, d).transpose(1, 2), cos, sin)
                out = self._attend(q.reshape(B, self.n_kv, rep * L, d), k, v, causal.view(1, 1, 1, L, P + L), attn.scaling)
                out = out.view(B, self.n_heads, L, d).transpose(1, 2).reshape(B, L, -1)
            else:  # the last layer: only the target rows are read
                x = x[rows, target][:, None]  # (B, 1, H)
                ht = h[rows, target][:, None]
                q = self._linear(attn.q_proj, ht).view(B, 1, self.n_heads, d).transpose(1, 2)
                q = _rotate(q, cos[0, 0, target][:, None, None], sin[0, 0, target][:, None, None])
                mask = causal[target]  # (B, P + L)
                out = self._attend(q.reshape(B, self.n_kv, rep, d), k, v, mask.view(B, 1, 1, 1, P + L), attn.scaling)
                out = out.reshape(B, 1, -1)
            x = x + self._linear(attn.o_proj, out)
            h = self._norm(x, layer.post_attention_layernorm)
            gated = F.silu(self._linear(mlp.gate_proj, h)) * self._linear(mlp.up_proj, h)
            x = x + self._linear(mlp.down_proj, gated)
        return self._norm(x[:, 0], self.body.norm)
