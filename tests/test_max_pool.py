"""regexp/population/max_pool.py against torch's max pooling (after relu): values and gradients bitwise
equal (ties included: the gradient goes to a window's first maximum), and the same double
backward (the probes' Hessian products differentiate through it)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regexp.population.max_pool import max_pool1d, relu_max_pool1d


@pytest.mark.parametrize("length", [9, 10])
def test_values_gradients_and_double_backward_equal_torchs(length):
    gen = torch.Generator().manual_seed(0)
    # relu's zeros make ties; duplicated values make ties away from zero
    x = torch.randn(4, 6, length, generator=gen).relu()
    x[..., 1::2] = torch.where(torch.rand(x[..., 1::2].shape, generator=gen) < 0.2, x[..., 0:length - 1:2],
                               x[..., 1::2])
    x.requires_grad_()
    a, b = F.max_pool1d(x, 2), max_pool1d(x)
    assert torch.equal(a, b)
    g = torch.randn(a.shape, generator=gen)
    assert torch.equal(*(torch.autograd.grad(y, x, g)[0] for y in (a, b)))
    v = torch.randn(x.shape, generator=gen)
    xx = torch.randn(x.shape, generator=gen, requires_grad=True)

    def hvp(pool):
        (gx,) = torch.autograd.grad(pool(xx).square().sum(), xx, create_graph=True)
        return torch.autograd.grad((gx * v).sum(), xx)[0]

    assert torch.equal(hvp(lambda t: F.max_pool1d(t, 2)), hvp(max_pool1d))


@pytest.mark.parametrize("length", [9, 10])
def test_relu_then_pooling_in_one_pass_equals_torchs(length):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, length, generator=gen)
    x[..., 1::2] = torch.where(torch.rand(x[..., 1::2].shape, generator=gen) < 0.2, x[..., 0:length - 1:2],
                               x[..., 1::2])  # ties, positive and negative
    x.requires_grad_()
    a, b = F.max_pool1d(F.relu(x), 2), relu_max_pool1d(x)
    assert torch.equal(a, b)
    g = torch.randn(a.shape, generator=gen)
    assert torch.equal(*(torch.autograd.grad(y, x, g)[0] for y in (a, b)))
    with torch.no_grad():
        assert torch.equal(F.max_pool1d(F.relu(x), 2), relu_max_pool1d(x))
