"""probe.backends.packed: packed weights give F.linear's products and input gradients, follow weight changes, and leave
weights that train to F.linear."""

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


def test_no_packing_for_a_weight_that_trains_or_off_the_cpu_path(monkeypatch):
    x, w = operands(torch.float32)
    wg = w.clone().requires_grad_(True)
    assert not packable(x, wg)  # a weight that trains needs F.linear's backward
    with torch.no_grad():
        assert packable(x, wg) == packed._enabled
    assert not packable(x.to(torch.float64), w.to(torch.float64))
    assert not packable(x, w.to(torch.bfloat16))
    out = PackedLinear()(x, wg)
    (grad,) = torch.autograd.grad(out.sum(), wg)
    torch.testing.assert_close(grad, x.sum(0).expand(80, -1))
    monkeypatch.setattr(packed, "_enabled", False)
    with torch.no_grad():
        assert not packable(x, w)
        assert torch.equal(PackedLinear()(x, w), F.linear(x, w))


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_to_the_input_goes_back_through_the_packed_transpose(dtype):
    """A frozen weight stays packed while the input takes a gradient (a prompt in front of a frozen LM): the
    products and the input's gradient are F.linear's (bfloat16: the same forward bits), the weight gets none."""
    if dtype not in packed._DTYPES:
        pytest.skip("this CPU has no oneDNN bfloat16")
    x, w = operands(dtype)
    x3 = x.view(1, 37, 48).expand(2, -1, -1).clone().requires_grad_(True)
    upstream = torch.randn(2, 37, 80, generator=torch.Generator().manual_seed(1)).to(dtype)
    linear = PackedLinear()
    out = linear(x3, w)
    (grad,) = torch.autograd.grad(out, x3, upstream)
    assert packable(x3, w) and len(linear._packed[id(w)].transposed) == 1  # packed once for the backward pass
    ref_x = x3.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, w)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, upstream)
    if dtype == torch.bfloat16:
        assert torch.equal(out, ref)
        torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=5e-2)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert grad.abs().max() > 1 and not w.requires_grad


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
