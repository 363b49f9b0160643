"""The Llama family's forward in plain tensors over the model's own weights (the arithmetic of transformers' Llama).

- attention as two batched matmuls with a causal mask (on CPU, cheaper than SDPA for inputs of a few tokens);
- no attention mask for padding: rows are right-padded, and a causal model never looks right;
- in the last layer only the target rows of each input go through attention, output projection and MLP;
- on CPU without autograd, the weights packed once for oneDNN (`probe.backends.packed`, bit-identical in bfloat16);
- inputs may continue a start's keys and values (`Start`), at positions and under a mask of their own;
- under autograd on CPU with frozen weights, each layer but the last runs as scoring runs it, and its input's
  gradient is written out (`_FrozenLayer`: a few dozen kernels instead of autograd's graph of every step).
What runs once and what is batched together is the backend's business (llama.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from probe.backends.packed import PackedLinear

FUSED_SOFTMAX_KEYS = 64  # from this many keys on, torch's softmax is cheaper than the written-out one
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # scaled_dot_product_attention(enable_gqa)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with the same roundings; without building rotate_half(x) when no gradient
    flows (under autograd, updating slices in place costs more in the backward pass than the copy saves)."""
    half = x.shape[-1] // 2
    if torch.is_grad_enabled():
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: float32, then the weight in the input dtype (F.rms_norm in bfloat16 rounds differently)."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _rms_norm_input_grad(x: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor) -> torch.Tensor:
    """The gradient to x of `_rms_norm(x, weight, eps)`, given the gradient to its output."""
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y, g = h * rstd, (grad * weight).float()
    return (rstd * (g - y * (g * y).mean(-1, keepdim=True))).to(x.dtype)


class _FrozenRMSNorm(torch.autograd.Function):
    """`_rms_norm` with a frozen weight, its input's gradient written out in float32: a few kernels instead of
    autograd's graph of the norm's steps."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _rms_norm(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.eps = inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return _rms_norm_input_grad(x, weight, ctx.eps, grad), None, None


def _unrotate(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient to x of `_rotate(x, cos, sin)`, given the gradient to its output."""
    half = grad.shape[-1] // 2
    turned = grad * sin
    return grad * cos + torch.cat((turned[..., half:], -turned[..., :half]), dim=-1)


class _FrozenLayer(torch.autograd.Function):
    """A decoder layer with frozen weights, run as scoring runs it, with its input's gradient written out: a few
    dozen kernels in the backward pass instead of autograd's graph of every step (`LlamaForward._layer_input_grad`).
    Its forward takes `ctx` because it saves tensors computed inside it; its backward is not differentiable again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, run: LlamaForward, layer, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        out, saved = run._layer_forward_saved(x, layer, cos, sin, mask)
        ctx.run, ctx.layer = run, layer
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return ctx.run._layer_input_grad(ctx.layer, grad, *ctx.saved_tensors), None, None, None, None, None


class Start(NamedTuple):
    """Keys and values (1 or B, kv, P, d) per layer of a start that rows continue: one for all, or one per row."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> Start:
        """The starts of `rows` (indices into this start's batch), in that order."""
        return Start([k[rows] for k in self.keys], [v[rows] for v in self.values])

    @staticmethod
    def cat(parts: Sequence[Start]) -> Start:
        """The rows of `parts`, in order."""
        return Start([torch.cat(k) for k in zip(*(p.keys for p in parts), strict=True)],
                     [torch.cat(v) for v in zip(*(p.values for p in parts), strict=True)])


class LlamaForward:
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
        """`norm(x)` as `_rms_norm` computes it."""
        if torch.is_grad_enabled() and x.requires_grad and not norm.weight.requires_grad:
            return _FrozenRMSNorm.apply(x, norm.weight, norm.variance_epsilon)
        return _rms_norm(x, norm.weight, norm.variance_epsilon)

    def _linear(self, module, x: torch.Tensor) -> torch.Tensor:
        """module(x); through its packed weight unless hooks watch the module (prefix-tuning sets keys and values so)."""
        if module._forward_hooks or module._forward_pre_hooks:
            return module(x)
        return self.linear(x, module.weight)

    def _attend(self, q, k, v, mask, scale) -> torch.Tensor:
        """q (B, kv, rep*Lq, d), k and v (B, kv, L, d), additive float mask broadcast to (B, 1, 1, Lq, L)."""
        return self._probs(q, k, mask, scale).to(q.dtype).view(*q.shape[:2], -1, k.shape[2]) @ v  # (B, kv, rep*Lq, d)

    def _probs(self, q, k, mask, scale) -> torch.Tensor:
        """The attention weights (B, kv, rep, Lq, L) of `_attend`, in float32 (or wider)."""
        B, n_kv, _, d = q.shape
        scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
        scores = scores.view(B, n_kv, self.n_heads // n_kv, -1, k.shape[2])
        scores = scores * scale + mask
        if torch.is_grad_enabled() or k.shape[2] >= FUSED_SOFTMAX_KEYS:  # one kernel (forward and backward)
            probs = torch.softmax(scores, dim=-1)
        else:  # written out: cheaper over a few keys
            probs = (scores - scores.amax(dim=-1, keepdim=True)).exp()
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def _attention(self, q, k, v, mask, scale, fused: bool) -> torch.Tensor:
        """q (B, heads, Lq, d), k and v (B, kv, K, d), an additive mask (1 or B, Lq, K) -> (B, heads, Lq, d);
        `fused`: torch's scaled-dot-product attention, cheaper for many queries (a trie after a prompt) when no
        gradient flows (its backward on CPU is slower than the eager one's)."""
        B, _, Lq, d = q.shape
        if fused:
            if not SDPA_GQA:  # torch < 2.5: each KV head repeated for its query heads
                k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=1) for t in (k, v))
            gqa = {"enable_gqa": True} if SDPA_GQA else {}
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None].to(q.dtype), scale=scale, **gqa)
        out = self._attend(q.reshape(B, self.n_kv, -1, d), k, v, mask.view(-1, 1, 1, Lq, k.shape[2]), scale)
        return out.view(B, self.n_heads, Lq, d)

    def _layer_forward_saved(self, x, layer, cos, sin, mask) -> tuple[torch.Tensor, tuple]:
        """A layer's output for inputs (B, L, H) with no start, as `_run` computes it, and what
        `_layer_input_grad` needs: the layer's input, q, k, v, attention weights, mid-layer state, gate and up."""
        attn = layer.self_attn
        B, L, _ = x.shape
        d = self.head_dim
        h = self._norm(x, layer.input_layernorm)
        q = _rotate(self._linear(attn.q_proj, h).view(B, L, self.n_heads, d).transpose(1, 2), cos, sin)
        k = _rotate(self._linear(attn.k_proj, h).view(B, L, self.n_kv, d).transpose(1, 2), cos, sin)
        v = self._linear(attn.v_proj, h).view(B, L, self.n_kv, d).transpose(1, 2)
        probs = self._probs(q.reshape(B, self.n_kv, -1, d), k, mask.view(-1, 1, 1, L, L), attn.scaling)
        out = probs.to(v.dtype).view(B, self.n_kv, -1, L) @ v
        mid = x + self._linear(attn.o_proj, out.view(B, self.n_heads, L, d).transpose(1, 2).reshape(B, L, -1))
        y, gate, up = self._mlp(mid, layer)
        return y, (x, q, k, v, probs, mid, gate, up, cos, sin)

    def _mlp(self, mid: torch.Tensor, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's second half on its mid-layer state: the layer's output, and the MLP's gate and up projections."""
        h = self._norm(mid, layer.post_attention_layernorm)
        gate, up = self._linear(layer.mlp.gate_proj, h), self._linear(layer.mlp.up_proj, h)
        return mid + self._linear(layer.mlp.down_proj, F.silu(gate) * up), gate, up

    def _layer_input_grad(self, layer, grad, x, q, k, v, probs, mid, gate, up, cos, sin) -> torch.Tensor:
        """The gradient to a layer's input (B, L, H), given the gradient to its output and the tensors
        `_layer_forward_saved` keeps."""
        attn, mlp = layer.self_attn, layer.mlp
        B, L, _ = grad.shape
        d, n_kv = self.head_dim, self.n_kv
        through = self.linear.input_grad
        dact = through(grad, mlp.down_proj.weight)
        dh = (through(torch.ops.aten.silu_backward(dact * up, gate), mlp.gate_proj.weight)
              + through(dact * F.silu(gate), mlp.up_proj.weight))
        norm = layer.post_attention_layernorm
        dmid = grad + _rms_norm_input_grad(mid, norm.weight, norm.variance_epsilon, dh)
        dout = through(dmid, attn.o_proj.weight).view(B, L, self.n_heads, d).transpose(1, 2).reshape(B, n_kv, -1, d)
        p = probs.view(B, n_kv, -1, L)
        dp = (dout @ v.transpose(-1, -2)).to(p.dtype)
        dv = p.to(v.dtype).transpose(-1, -2) @ dout
        ds = (p * (dp - (dp * p).sum(-1, keepdim=True)) * attn.scaling).to(q.dtype)
        dq = _unrotate((ds @ k).view(B, self.n_heads, L, d), cos, sin)
        dk = _unrotate(ds.transpose(-1, -2) @ q.reshape(B, n_kv, -1, d), cos, sin)

        def flat(t: torch.Tensor) -> torch.Tensor:  # (B, heads, L, d) -> (B, L, heads * d)
            return t.transpose(1, 2).reshape(B, L, -1)

        dh = (through(flat(dq), attn.q_proj.weight) + through(flat(dk), attn.k_proj.weight)
              + through(flat(dv), attn.v_proj.weight))
        norm = layer.input_layernorm
        return dmid + _rms_norm_input_grad(x, norm.weight, norm.variance_epsilon, dh)

    def _frozen(self, layer) -> bool:
        """Whether a layer's weights are all frozen and unwatched by hooks (then `_FrozenLayer` may run it)."""
        return not any(p.requires_grad for p in layer.parameters()) and not any(
            m._forward_hooks or m._forward_pre_hooks for m in layer.modules())

    def __call__(self, inputs_embeds: torch.Tensor, target: torch.Tensor, start: Start | None = None,
                 positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states at `target` of inputs (B, L, H) that continue `start` (one for all, or one per row):
        (B, H) for targets (B,), (B, T, H) for (B, T). `target` counts from after the start. By default the
        inputs follow the start and each other causally; else `positions` (B, L) and an additive `mask`
        (B, L, P + L) over the start's and the inputs' keys say where each input is and what it sees."""
        return self._run(inputs_embeds, target, start, positions, mask)[0]

    def with_kv(self, inputs_embeds: torch.Tensor, target: torch.Tensor, start: Start | None = None) -> tuple[torch.Tensor, Start]:
        """As calling it, and the keys and values of every position at every layer, with `start`'s in front."""
        return self._run(inputs_embeds, target, start, keep=True)

    def start_kv(self, inputs_embeds: torch.Tensor, start: Start | None = None) -> Start:
        """Keys and values at every layer of starts (B, P, H) that continue `start`, with `start`'s in front."""
        return self._run(inputs_embeds, None, start, keep=True)[1]

    def _run(self, x: torch.Tensor, target: torch.Tensor | None, start: Start | None, positions: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, keep: bool = False) -> tuple[torch.Tensor | None, Start]:
        B, L, _ = x.shape
        d = self.head_dim
        P = start.length if start is not None else 0
        if positions is None:
            positions = torch.arange(P, P + L, device=x.device)[None]
        cos, sin = self.body.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]  # (1 or B, 1, L, d)
        fused = mask is not None and not torch.is_grad_enabled()
        if mask is None:
            mask = torch.full((L, P + L), float("-inf"), device=x.device).triu(P + 1)[None]  # (1 or B, L, P + L)
        rows = torch.arange(B, device=x.device)
        single = target is not None and target.dim() == 1
        targets = target[:, None] if single else target  # (B, T)
        layers = self.body.layers[: self.body.config.num_hidden_layers]
        kept = Start([], [])
        # on CPU, layers but the last may run as one Function (on CUDA, autocast would leave its backward's dtypes mixed)
        whole = torch.is_grad_enabled() and start is None and not keep and x.device.type == "cpu"
        for i, layer in enumerate(layers):
            here = layer.input_layernorm.weight.device
            if x.device != here:  # a model placed over several devices: the activations follow the layers
                x, cos, sin, mask = x.to(here), cos.to(here), sin.to(here), mask.to(here)
                rows = rows.to(here)
                targets = targets.to(here) if targets is not None else None
            if whole and i < len(layers) - 1 and x.requires_grad and self._frozen(layer):
                x = _FrozenLayer.apply(x, self, layer, cos, sin, mask)
                continue
            attn = layer.self_attn
            h = self._norm(x, layer.input_layernorm)
            k = _rotate(self._linear(attn.k_proj, h).view(B, L, self.n_kv, d).transpose(1, 2), cos, sin)
            v = self._linear(attn.v_proj, h).view(B, L, self.n_kv, d).transpose(1, 2)
            if start is not None:
                k = torch.cat([start.keys[i].expand(B, -1, -1, -1), k], dim=2)
                v = torch.cat([start.values[i].expand(B, -1, -1, -1), v], dim=2)
            if keep:
                kept.keys.append(k)
                kept.values.append(v)
            if targets is None and i == len(layers) - 1:  # a start: only its keys and values are wanted
                return None, kept
            if i < len(layers) - 1:
                q = _rotate(self._linear(attn.q_proj, h).view(B, L, self.n_heads, d).transpose(1, 2), cos, sin)
                out = self._attention(q, k, v, mask, attn.scaling, fused).transpose(1, 2).reshape(B, L, -1)
            else:  # the last layer: only the target rows are read
                T = targets.shape[1]
                at = (rows[:, None], targets)
                x, ht = x[at], h[at]  # (B, T, H)
                q = self._linear(attn.q_proj, ht).view(B, T, self.n_heads, d).transpose(1, 2)
                q = _rotate(q, cos[:, 0].expand(B, -1, -1)[at][:, None], sin[:, 0].expand(B, -1, -1)[at][:, None])
                seen = mask.expand(B, -1, -1)[at]  # (B, T, P + L)
                out = self._attention(q, k, v, seen, attn.scaling, fused).transpose(1, 2).reshape(B, T, -1)
            x = self._mlp(x + self._linear(attn.o_proj, out), layer)[0]
        x = self._norm(x.to(self.body.norm.weight.device), self.body.norm)
        return (x[:, 0] if single else x), kept
