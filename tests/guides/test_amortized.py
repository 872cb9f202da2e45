import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae.guides import DeltaEncoder, LinearEncoder, MLPEncoder
from ppl_vae.guides.amortized import SCALE_FLOOR
from ppl_vae.models import VAE
from ppl_vae.data import load_dataset


@pytest.fixture(scope="module")
def binary_digits():
    return load_dataset("digits", "train", binarize="static")


def guide_site(guide, x, particles=None):
    if particles is None:
        return pyro.poutine.trace(guide).get_trace(x).nodes["z"]
    with pyro.plate("particles", particles, dim=-2):
        return pyro.poutine.trace(guide).get_trace(x).nodes["z"]


# -------------------------------------------------------------------------- MLPEncoder


def test_mlp_encoder_broadcasts_under_a_particle_plate(binary_digits):
    guide = MLPEncoder(64, 3, hidden=(16,))
    x = binary_digits[:5]
    q = guide.distribution(x)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    assert bool((q.base_dist.scale > 0).all())
    site = guide_site(guide, x, particles=7)
    assert site["value"].shape == (7, 5, 3)
    assert site["fn"].log_prob(site["value"]).shape == (7, 5)
    # The site's density is the one distribution(x) describes.
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), q.log_prob(site["value"]))


def test_mlp_encoder_scale_has_a_floor():
    guide = MLPEncoder(8, 2, hidden=(4,))
    last = guide.net.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1e4)  # softplus underflows to exactly 0
    q = guide.distribution(torch.randn(3, 8))
    torch.testing.assert_close(q.base_dist.scale, torch.full((3, 2), SCALE_FLOOR))
    assert bool(torch.isfinite(q.log_prob(q.sample())).all())


def test_mlp_encoder_refuses_bad_arguments():
    with pytest.raises(ValueError, match="data_dim"):
        MLPEncoder(0, 2)
    with pytest.raises(ValueError, match="latent_dim"):
        MLPEncoder(8, 0)
    with pytest.raises(ValueError, match="activation"):
        MLPEncoder(8, 2, activation="swish")


# ----------------------------------------------------------------------- LinearEncoder


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_linear_encoder_distribution_is_its_site(covariance):
    pyro.set_rng_seed(0)
    guide = LinearEncoder(6, 3, covariance=covariance)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, 6)
    q = guide.distribution(x)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    site = guide_site(guide, x, particles=4)
    z = site["value"]
    torch.testing.assert_close(site["fn"].log_prob(z), q.log_prob(z))
    # Unchanged behaviour: loc = A x + b and the shared scale_tril.
    torch.testing.assert_close(q.mean, guide.loc(x))
    expected = torch.distributions.MultivariateNormal(guide.loc(x), scale_tril=guide.scale_tril())
    torch.testing.assert_close(q.log_prob(z), expected.log_prob(z))


# ------------------------------------------------------------------------ DeltaEncoder


def test_delta_elbo_is_the_autoencoder_loss(binary_digits):
    # One particle of Trace_ELBO with a point-mass guide: no entropy, no noise, so
    # loss = -sum_n [log p(x_n | g(x_n)) + log N(g(x_n); 0, I)], written out by hand.
    pyro.set_rng_seed(0)
    model = VAE(64, 3, hidden=(16,)).double()
    guide = DeltaEncoder(64, 3, hidden=(16,)).double()
    x = binary_digits[:20].double()
    loss = Trace_ELBO(max_plate_nesting=1)(model, guide)(x)
    z = guide.net(x)
    logits = model.decoder(z)
    reconstruction = (x * logits - F.softplus(logits)).sum()
    prior = -0.5 * z.square().sum() - 0.5 * z.numel() * math.log(2 * math.pi)
    torch.testing.assert_close(loss, -(reconstruction + prior), rtol=1e-12, atol=1e-10)
    # And its gradient reaches the encoder, through z = g(x).
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())


def test_delta_encoder_trains(binary_digits):
    pyro.set_rng_seed(0)
    model, guide = VAE(64, 4, hidden=(32,)), DeltaEncoder(64, 4, hidden=(32,))
    result = ppl_vae.fit(
        model, guide, binary_digits, epochs=10, batch_size=128, lr=1e-2, seed=0, progress=False
    )
    steps = math.ceil(len(binary_digits) / 128)  # one epoch of minibatch estimates
    first = torch.as_tensor(result.history[:steps])
    last = torch.as_tensor(result.history[-steps:])
    se = math.sqrt(first.var() / steps + last.var() / steps)
    assert float(last.mean() - first.mean()) > 5 * se


def test_delta_is_refused_as_an_importance_proposal(binary_digits):
    model, delta = VAE(64, 2, hidden=(8,)), DeltaEncoder(64, 2, hidden=(8,))
    x = binary_digits[:10]
    assert isinstance(delta.distribution(x), torch.distributions.Independent)
    with pytest.raises(ValueError, match="point mass.*Delta"):
        ppl_vae.log_marginal(model, delta, x, 10)
    with pytest.raises(ValueError, match="point mass"):
        ppl_vae.elbo(model, delta, x, 10)
    # The prior as proposal never runs the guide: same answer whatever guide is passed.
    prior = ppl_vae.log_marginal(model, delta, x, 100, proposal="prior", seed=0)
    other = MLPEncoder(64, 2, hidden=(8,))
    assert prior.shape == (10,) and bool(torch.isfinite(prior).all())
    torch.testing.assert_close(
        prior, ppl_vae.log_marginal(model, other, x, 100, proposal="prior", seed=0)
    )
