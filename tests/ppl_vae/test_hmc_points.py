"""AIS's HMC hands on the Point a transition ends at: its densities and gradients must be
those of a fresh evaluation there, and with a fixed proposal q the two gradients kept
apart must give d/du log f_beta at every beta (checked against plain autograd)."""

import pytest
import torch
import torch.nn.functional as F

import ppl_vae
from ppl_vae import hmc
from ppl_vae.guides import MLPEncoder
from ppl_vae.models import VAE
from ppl_vae.seeding import blocks

N, D, K, CHAINS = 5, 12, 3, 64


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model, encoder = VAE(D, K, hidden=(8,)), MLPEncoder(D, K, hidden=(8,))
    for p in (*model.parameters(), *encoder.parameters()):
        p.requires_grad_(False)
    x = (torch.rand(N, D) < 0.5).float()
    return model, encoder, x


def _target(model, guide, x, jit=True):
    space = ppl_vae.estimators.check_structure(model, x)
    idx = torch.arange(N)
    block = next(iter(blocks(idx)))
    noise = hmc.Noise([block], 0, CHAINS, x[block.rows], idx[block.rows])
    return hmc.Target(model, guide, space, x, idx, N, jit=jit), noise


def _plain_log_f(model, encoder, x, u, beta):
    """(1 - beta) log q(u | x) + beta log p(x, u), written out with torch."""
    log_q = encoder.distribution(x).log_prob(u)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1)
    logits = model.decoder(u)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                  reduction="none").sum(-1)
    return (1 - beta) * log_q + beta * (log_prior + log_lik)


@pytest.mark.parametrize("jit", [True, False])
def test_a_fixed_proposal_gives_every_betas_gradient_from_one_point(vae, jit):
    model, encoder, x = vae
    target, _ = _target(model, encoder, x, jit=jit)
    u = torch.randn(CHAINS, N, K)
    point = target.point(u, 0.3)
    assert point.grad_q is not None  # the gradients are kept apart
    for beta in (0.0, 0.3, 0.77, 1.0):
        at = u.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(_plain_log_f(model, encoder, x, at, beta).sum(), at)
        torch.testing.assert_close(point.grad(beta), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(point.log_f(beta),
                                   _plain_log_f(model, encoder, x, u, beta).detach(),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("proposal", ["encoder", "prior"])
def test_the_point_a_transition_hands_on_is_a_fresh_evaluation_there(vae, proposal):
    model, encoder, x = vae
    target, noise = _target(model, encoder if proposal == "encoder" else None, x)
    torch.manual_seed(1)
    start = target.values(torch.randn(CHAINS, N, K))
    eps = torch.full((N,), 0.6)
    end, accept = hmc.hmc_transition(target, start, 0.4, eps, 3, noise)
    moved = (end.u != start.u).any(-1)
    assert moved.any() and not moved.all()  # both sides of the selection are exercised
    fresh = target.values(end.u)
    torch.testing.assert_close(end.log_q, fresh.log_q, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(end.log_p, fresh.log_p, rtol=1e-5, atol=1e-4)
    # The next transition's beta: reused where the gradients are apart, else recomputed.
    next_beta = 0.55
    assert end.has_grad(next_beta) == (proposal == "encoder")
    beta = next_beta if proposal == "encoder" else 0.4
    torch.testing.assert_close(end.grad(beta), target.point(end.u, beta).grad(beta),
                               rtol=1e-4, atol=1e-5)
