"""Linear layers with weights packed once into oneDNN's layout, for inference on CPU.

`F.linear` re-lays a weight out for oneDNN on every call. Packing it once gives the same products, faster
(BENCHMARKS.md has the figures):
- bfloat16: bit-identical to `F.linear`;
- float32: the sums in another order (a few 1e-6, relative).
The packed copies take about as much memory again as the weights they copy.
Used on CPU when the weight takes no gradient: a gradient that flows to the input (a prompt trained in front of
the frozen LM) goes back through the transposed weight, packed too. Elsewhere (a weight that trains, another
device), or with a torch build that lacks these operators, `F.linear` runs instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from probe.backends.base import weight_stamp

_ops = getattr(torch.ops, "mkldnn", None)
_enabled = (
    torch.backends.mkldnn.is_available()
    and hasattr(_ops, "_reorder_linear_weight")
    and hasattr(_ops, "_linear_pointwise")
)


def _dtypes() -> set[torch.dtype]:
    bf16 = getattr(_ops, "_is_mkldnn_bf16_supported", None)
    return {torch.float32, torch.bfloat16} if bf16 is not None and bf16() else {torch.float32}


_DTYPES = _dtypes() if _enabled else set()


def disable() -> None:
    """Use `F.linear` from now on (after an error, or to compare the two)."""
    global _enabled
    _enabled = False


def packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `PackedLinear()(x, weight)` multiplies through a packed weight."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in _DTYPES
        and not (torch.is_grad_enabled() and weight.requires_grad)
    )


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _ops._linear_pointwise(x, packed, bias, "none", [], "")


class Packed(NamedTuple):
    """A weight, its stamp when packed, its packed copy, and (once a gradient has needed it) its transpose's."""

    weight: torch.Tensor
    stamp: tuple
    packed: torch.Tensor
    transposed: list[torch.Tensor]  # empty until a backward pass asks for it

    def backward_weight(self) -> torch.Tensor:
        if not self.transposed:
            self.transposed.append(_ops._reorder_linear_weight(self.weight.detach().t().contiguous()))
        return self.transposed[0]


class _FrozenLinear(torch.autograd.Function):
    """x @ W.T + b through the packed W; the input's gradient through the packed W.T (W and b take none)."""

    @staticmethod
    def forward(x: torch.Tensor, entry: Packed, bias: torch.Tensor | None) -> torch.Tensor:
        return _product(x, entry.packed, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.entry = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _product(grad.contiguous(), ctx.entry.backward_weight()), None, None


class PackedLinear:
    """`F.linear` over weights packed on first use, and packed again when a weight changes in place."""

    def __init__(self):
        self._packed: dict[int, Packed] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not packable(x, weight) or (bias is not None and bias.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, weight, bias)
        try:
            entry = self._entry(weight)
            if torch.is_grad_enabled() and x.requires_grad:
                return _FrozenLinear.apply(x, entry, bias)
            return _product(x, entry.packed, bias)
        except RuntimeError:  # something this build or CPU lacks: F.linear from now on (it raises any real error)
            disable()
            return F.linear(x, weight, bias)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """grad @ weight: the gradient to the input of `self(x, weight)`, through the packed transpose where it can."""
        if packable(grad, weight):
            try:
                return _product(grad.contiguous(), self._entry(weight).backward_weight())
            except RuntimeError:
                disable()
        return grad @ weight

    def _entry(self, weight: torch.Tensor) -> Packed:
        stamp = weight_stamp(weight)
        entry = self._packed.get(id(weight))  # the entry holds `weight`, so no other tensor can take its id
        if entry is None or entry.stamp != stamp:
            entry = self._packed[id(weight)] = Packed(weight, stamp, _ops._reorder_linear_weight(weight.detach()), [])
        return entry

    def clear(self) -> None:
        self._packed.clear()
