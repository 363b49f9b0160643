"""The Llama family (SmolLM2, Llama): a causal LM backend with its own faster forward.

The same arithmetic as transformers' Llama, written out in plain tensors over the model's own weights:
- attention as two batched matmuls with a causal mask (on CPU, cheaper than SDPA for inputs of a few tokens);
- no attention mask for padding: rows are right-padded, and a causal model never looks right;
- in the last layer only the target row of each input goes through attention, output projection and MLP;
- on CPU without autograd, the weights packed once for oneDNN (`probe.backends.packed`, bit-identical in bfloat16);
- when scoring without gradients, a start that inputs share (a template's leading words or virtual tokens, then
  a subject's first tokens) runs once, and the rows continue its keys and values (`Start`); a first token sees
  no other, so its keys and values are kept across relations;
- in training (gradients on, the same prompt in every row), a batch runs as one sequence: the start its rows
  share once, then each row's tokens up to its target, no padding, with a mask that keeps rows apart;
- under autograd on CPU with frozen weights, each layer but the last runs as scoring runs it, and its input's
  gradient is written out (`_FrozenLayer`: a few dozen kernels instead of autograd's graph of every step);
- objects of any length: the candidates' trie nodes continue each prompt's keys and values, with a tree mask.
`supports(config)` says for which configs this is exactly what transformers computes; others get `CausalLM`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from probe.backends.base import CONTEXT_POSITIONS, PromptInputs, register, weight_stamp
from probe.backends.causal import CausalLM, tree_attention
from probe.backends.packed import PackedLinear
from probe.batching import Batch
from probe.objects import ObjectCandidates
from probe.vocab import CandidateVocab

FIRST_TOKENS_MAX = 8192  # first tokens whose keys and values a backend keeps across relations
FIRST_TOKENS_CHUNK = 64  # first tokens run in passes of exactly this many rows (see `first_token_starts`)
FUSED_SOFTMAX_KEYS = 64  # from this many keys on, torch's softmax is cheaper than the written-out one


def plain_llama(config) -> bool:
    """Whether `LlamaForward` computes exactly what transformers computes for this config."""
    return (
        config.model_type == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
    )


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
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None].to(q.dtype), scale=scale, enable_gqa=True)
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
        x = self._norm(x, self.body.norm)
        return (x[:, 0] if single else x), kept


@dataclass
class FirstTokens:
    """Keys and values of inputs' first tokens, one row per token (`row[token]`), valid while `stamp` holds."""

    stamp: tuple
    row: dict[int, int] = field(default_factory=dict)
    start: Start | None = None


class SharedStarts(NamedTuple):
    """The starts of some batches' inputs, each distinct start run once.

    `start` is what every input begins with (its first `common` tokens, say "The capital of"), followed, where
    inputs share them often enough, by the next few tokens (say a subject's first): then `start` has one row
    per distinct start, and `row_start[i]` is the one the i-th input of the batches (in order) continues.
    """

    start: Start
    common: int
    row_start: torch.Tensor | None  # None: `start` is one start for every input

    def for_rows(self, first: int, count: int) -> Start:
        """The starts of inputs first .. first + count - 1 of the batches."""
        if self.row_start is None:
            return self.start
        return self.start.select(self.row_start[first : first + count])


@register
class LlamaCausalLM(CausalLM):
    """A Llama-architecture causal LM through `LlamaForward`; shared starts run once."""

    def __init__(self, model, tokenizer, name: str, device: str = "cpu", control: str = "none"):
        super().__init__(model, tokenizer, name, device, control)
        self.forward = LlamaForward(model)
        self._candidate_linear = PackedLinear()  # the candidate rows, packed on CPU for float32 products
        self._packed_rows: object | None = None  # the CandidateRows packed in _candidate_linear
        self._vocab_linear = PackedLinear()  # every output row, packed (objects of any length)
        self._first_tokens: FirstTokens | None = None

    @classmethod
    def supports(cls, config) -> bool:
        return plain_llama(config)

    def target_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs_embeds, target)

    def candidate_logits(self, hidden: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        rows = self.candidate_rows(candidate_ids)
        if rows is not self._packed_rows:
            self._candidate_linear.clear()
            self._packed_rows = rows
        return self._candidate_linear(hidden.float(), rows.weight, rows.bias)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = self.vocab_rows()
        return self._vocab_linear(hidden.float(), rows.weight, rows.bias)

    def hidden_at(self, inputs_embeds: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs_embeds, reads)

    def score_tokens(self, batches: Sequence[Batch], prompt: PromptInputs, candidates: CandidateVocab) -> Iterator[torch.Tensor]:
        """As `Backend.score_tokens`, through `_prompt_passes`."""
        for _, hidden, _ in self._prompt_passes(batches, prompt):
            yield self.candidate_logits(hidden, candidates.token_ids)

    def score_objects(self, batches: Sequence[Batch], prompt: PromptInputs, candidates: ObjectCandidates) -> Iterator[torch.Tensor]:
        """As `Backend.score_objects`: the prompt passes of `score_tokens` keep their keys and values, and the trie's
        inner nodes continue them, CONTEXT_POSITIONS node positions at a time."""
        contexts = candidates.contexts(self.kind)
        tokens, sees, depth = contexts.tree
        for batch, root, kv in self._prompt_passes(batches, prompt, keep_kv=len(tokens) > 0):
            hidden = root[:, None]
            if len(tokens):
                tree = self.embed(tokens.to(self.device))
                step = max(1, CONTEXT_POSITIONS // len(tokens))
                parts = [hidden]
                for r0 in range(0, len(batch.facts), step):
                    rows = torch.arange(r0, min(len(batch.facts), r0 + step), device=self.device)
                    start = kv.select(rows)
                    mask, positions = tree_attention(batch.target[rows], start.length, sees, depth, torch.float32,
                                                     float("-inf"))
                    reads = torch.arange(len(tokens), device=self.device).expand(len(rows), -1)
                    parts.append(self.forward(tree.expand(len(rows), -1, -1), reads, start, positions, mask))
                hidden = torch.cat([parts[0], torch.cat(parts[1:])], dim=1)
            yield candidates.normalise(contexts.sum_edges(self.edge_logprobs(hidden, contexts)))

    def _prompt_passes(self, batches: Sequence[Batch], prompt: PromptInputs, keep_kv: bool = False
                       ) -> Iterator[tuple[Batch, torch.Tensor, Start | None]]:
        """(batch on the device, hidden states (B, H) at its targets, and with `keep_kv` the keys and values of its
        positions, every row's whole input). With the same prompt in every row: without gradients, each distinct
        start runs once; with them, each batch runs as one sequence (`_one_sequence`)."""
        same_prompt = prompt.prefix is None and (prompt.embeddings is None or prompt.embeddings.dim() == 2)
        grad = torch.is_grad_enabled()
        starts = self.shared_starts(batches, prompt) if same_prompt and not grad else None
        done = 0
        for batch in batches:
            if same_prompt and grad and not keep_kv:
                batch = batch.to(self.device)
                yield batch, self._one_sequence(batch, prompt), None
                continue
            start = starts.for_rows(done, len(batch.facts)) if starts is not None else None
            done += len(batch.facts)
            batch = batch.to(self.device)
            n = start.length if start is not None else 0
            embeds = self.input_embeddings(batch, prompt)[:, n:]
            with self.prefix_tuning(prompt.prefix, batch.virtual_mask):
                hidden, kv = self.forward.with_kv(embeds, batch.target - n, start) if keep_kv else (
                    self.forward(embeds, batch.target - n, start), None)
            yield batch, hidden, kv

    def _one_sequence(self, batch: Batch, prompt: PromptInputs) -> torch.Tensor:
        """Hidden states (B, H) at a batch's targets, its rows run as one sequence: first the tokens that every row
        begins with (leading virtual tokens or template words), once, then each row's own tokens up to its target.
        Each token sees the shared start and its own row's earlier tokens, at its position in its row; the weights'
        products skip the repeated start and the padding."""
        embeds = self.input_embeddings(batch, prompt)  # (B, L, H)
        B, L, _ = embeds.shape
        first = int(batch.target.min())
        n = _common_start(batch.input_ids[:, :first], batch.virtual_mask[:, :first])  # every row keeps its target
        place = torch.arange(n, L, device=self.device)
        own = place[None] <= batch.target[:, None]  # (B, L - n): each row's tokens after the start
        row = torch.arange(B, device=self.device)[:, None].expand(-1, L - n)[own]
        x = torch.cat([embeds[0, :n], embeds[:, n:][own]])[None]  # (1, n + own tokens, H)
        positions = torch.cat([torch.arange(n, device=self.device), place.expand(B, -1)[own]])
        rows = torch.cat([row.new_full((n,), -1), row])  # -1: the shared start
        sees = (positions[None] <= positions[:, None]) & ((rows[None] == -1) | (rows[None] == rows[:, None]))
        mask = torch.zeros(sees.shape, device=self.device).masked_fill(~sees, float("-inf"))
        targets = n + own.sum(dim=1).cumsum(dim=0) - 1  # each row's last token
        return self.forward(x, targets[None], None, positions[None], mask[None])[0]

    def shared_starts(self, batches: Sequence[Batch], prompt: PromptInputs) -> SharedStarts | None:
        """The starts of the inputs of `batches`, each distinct one run once (see `SharedStarts`); None if no
        input shares its start with another. Every input keeps at least its target position to run."""
        if not batches:
            return None
        longest = min(int(b.target.min()) for b in batches)
        ids = torch.cat([b.input_ids[:, :longest] for b in batches])  # every input's tokens before the first target
        virtual = torch.cat([b.virtual_mask[:, :longest] for b in batches])
        n = _common_start(ids, virtual)
        start = None
        if n:
            embeds = self.input_embeddings(batches[0].to(self.device), prompt)
            start = self.forward.start_kv(embeds[:1, :n])
        k = _distinct_tokens_after(ids[:, n:], virtual[:, n:])
        if not k:
            return SharedStarts(start, n, None) if start is not None else None
        distinct, row_start = ids[:, n : n + k].unique(dim=0, return_inverse=True)
        if n == 0 and k == 1:  # the inputs' first tokens: kept across relations
            start = self.first_token_starts(distinct[:, 0])
        else:
            start = self.forward.start_kv(self.embed(distinct.to(self.device)), start)
        return SharedStarts(start, n, row_start.to(self.device))

    def first_token_starts(self, ids: torch.Tensor) -> Start:
        """`start_kv` of inputs that begin with the tokens `ids` (U,), one row each. A first token sees no
        other, so its keys and values are run once per token and kept for later relations (run again if the
        weights change; at most FIRST_TOKENS_MAX tokens are kept). New tokens run in passes of FIRST_TOKENS_CHUNK
        rows, the last padded: a CPU's bfloat16 products round by how many rows they multiply, so a token's keys
        and values, and a relation's figures, would otherwise depend on the relations run before it."""
        stamp = tuple(weight_stamp(p) for p in self.model.parameters())
        kept = self._first_tokens
        if kept is None or kept.stamp != stamp:
            kept = self._first_tokens = FirstTokens(stamp)
        new = list(dict.fromkeys(t for t in ids.tolist() if t not in kept.row))
        if len(kept.row) + len(new) > FIRST_TOKENS_MAX:  # start over with only these tokens
            kept = self._first_tokens = FirstTokens(stamp)
            new = list(dict.fromkeys(ids.tolist()))
        parts = [] if kept.start is None else [kept.start]
        for i in range(0, len(new), FIRST_TOKENS_CHUNK):
            chunk = new[i : i + FIRST_TOKENS_CHUNK]
            padded = chunk + chunk[-1:] * (FIRST_TOKENS_CHUNK - len(chunk))
            run = self.forward.start_kv(self.embed(torch.tensor(padded, device=self.device)[:, None]))
            parts.append(Start([k[: len(chunk)] for k in run.keys], [v[: len(chunk)] for v in run.values]))
        if new:
            kept.start = Start.cat(parts)
            kept.row.update({t: len(kept.row) + j for j, t in enumerate(new)})
        return kept.start.select(torch.tensor([kept.row[t] for t in ids.tolist()], device=self.device))


def _common_start(ids: torch.Tensor, virtual: torch.Tensor) -> int:
    """How many leading positions every row of `ids` (and of its virtual-slot mask) has alike."""
    differ = ((ids != ids[0]) | (virtual != virtual[0])).any(dim=0).nonzero()
    return int(differ[0]) if len(differ) else ids.shape[1]


def _distinct_tokens_after(ids: torch.Tensor, virtual: torch.Tensor) -> int:
    """How many leading tokens of `ids` (rows, L) to run once per distinct run of them: the count (real tokens
    only, `virtual` marks the others) that saves the most token positions, 0 if none saves any."""
    best, saved = 0, 0
    for k in range(1, ids.shape[1] + 1):
        if virtual[:, :k].any():
            break
        distinct = len(ids[:, :k].unique(dim=0))
        if k * (len(ids) - distinct) > saved:
            best, saved = k, k * (len(ids) - distinct)
    return best
