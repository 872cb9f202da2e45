"""fit clears the gradients before each step as zero_grad(set_to_none=True) would."""

from __future__ import annotations

import torch

from ppl_vae.train import _clear_grads


def _params_with_grads():
    params = [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    return params


def test_a_torch_optimizer_has_every_gradient_set_to_none():
    first, second = _params_with_grads(), _params_with_grads()
    opt = torch.optim.Adam([{"params": first}, {"params": second, "lr": 0.1}])
    _clear_grads(opt)
    assert all(p.grad is None for p in first + second)


def test_an_optimizer_with_its_own_zero_grad_is_asked_to_clear_them():
    calls = []

    class Logged(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            calls.append(set_to_none)
            super().zero_grad(set_to_none=set_to_none)

    params = _params_with_grads()
    _clear_grads(Logged(params, lr=0.1))
    assert calls == [True] and all(p.grad is None for p in params)
