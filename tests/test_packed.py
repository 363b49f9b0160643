"""probe.backends.packed: packed weights give F.linear's products, follow weight changes, and stay out of autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from probe.backends import packed
from probe.backends.packed import PackedLinear, packable

needs_packing = pytest.mark.skipif(not packed._enabled, reason="this torch build has no oneDNN linear packing")
needs_bf16 = pytest.mark.skipif(torch.bfloat16 not in packed._DTYPES, reason="this CPU has no oneDNN bfloat16")


def operands(dtype, rows=37, n_in=48, n_out=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n_in, generator=g).to(dtype), torch.randn(n_out, n_in, generator=g).to(dtype)


@needs_packing
@needs_bf16
def test_bfloat16_is_bit_identical_to_f_linear():
    x, w = operands(torch.bfloat16)
    x3 = x.view(1, 37, 48).expand(3, -1, -1)  # (B, L, H) inputs as the forward passes them
    with torch.no_grad():
        assert packable(x, w)
        assert torch.equal(PackedLinear()(x, w), F.linear(x, w))
        assert torch.equal(PackedLinear()(x3, w), F.linear(x3, w))


@needs_packing
def test_float32_is_close_to_f_linear_with_a_bias():
    x, w = operands(torch.float32)
    bias = torch.randn(80)
    with torch.no_grad():
        got = PackedLinear()(x, w, bias)
    torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    assert got.shape == (37, 80)


@needs_packing
def test_a_weight_changed_in_place_or_converted_is_packed_again():
    x, w = operands(torch.float32)
    linear = PackedLinear()
    with torch.no_grad():
        first = linear(x, w)
        w.mul_(-2.0)  # in place: the same tensor, a new version
        torch.testing.assert_close(linear(x, w), -2.0 * first, rtol=1e-5, atol=1e-4)
        layer = torch.nn.Linear(48, 80, bias=False)
        layer.weight.copy_(w)
        torch.testing.assert_close(linear(x, layer.weight), F.linear(x, w), rtol=1e-5, atol=1e-4)
        layer.to(torch.bfloat16)  # the same Parameter, its data replaced
        xb = x.to(torch.bfloat16)
        got = linear(xb, layer.weight)  # packed again in bfloat16, or F.linear where oneDNN has no bfloat16
        assert got.dtype == torch.bfloat16 and torch.equal(got, F.linear(xb, layer.weight))


def test_no_packing_where_a_gradient_flows_or_off_the_cpu_path(monkeypatch):
    x, w = operands(torch.float32)
    xg = x.clone().requires_grad_(True)
    assert not packable(xg, w)  # autograd needs F.linear's backward
    with torch.no_grad():
        assert packable(xg, w) == packed._enabled
    assert not packable(x.to(torch.float64), w.to(torch.float64))
    assert not packable(x, w.to(torch.bfloat16))
    out = PackedLinear()(xg, w)
    (grad,) = torch.autograd.grad(out.sum(), xg)
    torch.testing.assert_close(grad, w.sum(0).expand(37, -1))
    monkeypatch.setattr(packed, "_enabled", False)
    with torch.no_grad():
        assert not packable(x, w)
        assert torch.equal(PackedLinear()(x, w), F.linear(x, w))


def test_an_operator_that_fails_turns_packing_off(monkeypatch):
    class Broken:
        def _reorder_linear_weight(self, weight):
            raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(packed, "_enabled", True)
    monkeypatch.setattr(packed, "_DTYPES", {torch.float32})
    monkeypatch.setattr(packed, "_ops", Broken())
    x, w = operands(torch.float32)
    with torch.no_grad():
        assert torch.equal(PackedLinear()(x, w), F.linear(x, w))
        assert not packed._enabled and not packable(x, w)
