"""fit_local's flow fit: the sticking-the-landing gradient and the cosine on every row's rate."""

import math

import pytest
import torch
from torch import Tensor

from ppl_vae.gradients import StickingTheLanding
from ppl_vae.guides.latent_space import LatentSpace
from ppl_vae.guides.local import LocalFlow, LocalFull
from ppl_vae.local_elbo import LocalELBO
from ppl_vae.models import PPCA, VAE
from ppl_vae.row_convergence import LR_DECAY, Noised, RowPlateau, row_noise
from tests.helpers import exact_posterior

K = 4


def _gradients(loss_fn, model, guide, x) -> tuple[Tensor, dict]:
    for param in guide.parameters():
        param.grad = None
    loss = loss_fn.differentiable_loss(model, guide, x, None, len(x))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in guide.named_parameters()}


def _noised(guide, x):
    noise = row_noise(0, len(x), (K, guide.latent_dim), 0, dtype=x.dtype)
    return Noised(guide, noise, whole=True)


@pytest.mark.parametrize("cls", [LocalFull, LocalFlow])
def test_sticking_gradient_is_zero_where_q_is_the_exact_posterior(cls):
    # Where q_n = p(z | x_n), log p(x_n, z) - log q_n(z) is constant in z: every draw's
    # STL gradient is zero (a flow at its identity layers is that Gaussian too), while
    # the plain reparameterized gradient keeps the score term, which is not.
    torch.manual_seed(0)
    model = PPCA(5, 2).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    model.requires_grad_(False)
    post = exact_posterior(model, x)
    space = LatentSpace.of(model, x)
    guide = _noised(cls.from_gaussian(post.loc, post.scale_tril, space), x)
    names = space.names
    plain_value, plain = _gradients(LocalELBO(K, names, None), model, guide, x)
    stl_value, stl = _gradients(LocalELBO(K, names, None, sticking=True), model, guide, x)
    torch.testing.assert_close(stl_value, plain_value, rtol=1e-12, atol=1e-10)
    assert max(float(g.abs().max()) for g in plain.values()) > 1e-2
    for name, grad in stl.items():
        assert float(grad.abs().max()) < 1e-9, name


def test_sticking_gradient_of_a_flow_equals_the_generic_estimator():
    # LocalELBO replays the flow without its noise; ppl_vae.gradients replays the guide
    # as it is. Same draws, same stopped log q: the same gradient, and not the plain one.
    torch.manual_seed(1)
    model = VAE(6, 3, hidden=(8,)).double()
    model.requires_grad_(False)
    x = (torch.rand(5, 6, dtype=torch.float64) < 0.5).double()
    space = LatentSpace.of(model, x)
    flow = LocalFlow(len(x), space).double()
    with torch.no_grad():  # layers away from the identity, so the inverse is exercised
        for param in flow.parameters():
            param.add_(0.3 * torch.randn_like(param))
    guide = _noised(flow, x)
    ours_value, ours = _gradients(LocalELBO(K, space.names, None, sticking=True),
                                  model, guide, x)
    generic_value, generic = _gradients(StickingTheLanding(K), model, guide, x)
    _, plain = _gradients(LocalELBO(K, space.names, None), model, guide, x)
    torch.testing.assert_close(ours_value, generic_value, rtol=1e-12, atol=1e-10)
    for name in ours:
        torch.testing.assert_close(ours[name], generic[name], rtol=1e-8, atol=1e-10,
                                   msg=name)
    assert max(float((ours[n] - plain[n]).abs().max()) for n in ours) > 1e-3


def test_rates_follow_the_cosine_times_each_rows_decays():
    rows, steps, lr = 3, 100, 0.1
    calls = []

    def measure():  # row 0 keeps improving, rows 1 and 2 are flat: they decay alone
        calls.append(1)
        return torch.tensor([float(len(calls)), 0.0, 0.0])

    schedule = RowPlateau(lr, rows, tol=1e-3, window=5, steps=steps, measure=measure,
                          set_step=lambda step: None)
    opt = schedule.optimizer([torch.nn.Parameter(torch.zeros(rows, 2))])
    for step in range(steps):
        schedule(step, 0.0)
        factor = 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        expected = lr / LR_DECAY ** schedule.decays.double() * factor
        torch.testing.assert_close(opt.row_lr, expected, rtol=1e-12, atol=1e-15)
    assert int(schedule.decays[0]) == 0 and int(schedule.decays[1:].min()) >= 2
    assert float(opt.row_lr.abs().max()) < 1e-15  # at rest by the last step
