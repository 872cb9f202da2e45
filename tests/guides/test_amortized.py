import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae.data import load_dataset
from ppl_vae.guides import DeltaEncoder, FlowEncoder, LinearEncoder, MLPEncoder
from ppl_vae.guides.amortized import SCALE_FLOOR
from ppl_vae.models import VAE
from tests.helpers import exact_posterior

# Excess KL, in nats per datapoint, that an encoder fitted by the schedule below is
# allowed short of its family's optimum (measured: ~0.01 on the rotated PPCA).
OPTIMIZATION_SLACK = 0.02


@pytest.fixture(scope="module")
def binary_digits():
    return load_dataset("digits", "train", binarize="static")


def fit_to_fixed_model(model, encoder, x):
    """Fit ``encoder`` to a fixed ``model`` on all of ``x``, the learning rate stepped down."""
    for seed, (lr, steps) in enumerate([(5e-2, 600), (5e-3, 300), (5e-4, 200)]):
        ppl_vae.fit(model, encoder, x, num_steps=steps, lr=lr, seed=seed, progress=False,
                    train_model=False)
    return encoder


def mean_field_gap(model, x) -> float:
    """(sum log diag P - log det P) / 2, P the posterior precision: the KL of the best
    diagonal Gaussian from p(z | x), the same for every datapoint of a PPCA."""
    precision = torch.linalg.inv(exact_posterior(model, x[:1]).covariance_matrix[0])
    return float(0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)))


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


def test_full_mlp_encoder_is_a_cholesky_gaussian_under_a_particle_plate(binary_digits):
    pyro.set_rng_seed(0)
    guide = MLPEncoder(64, 3, hidden=(16,), covariance="full")
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = binary_digits[:5]
    q = guide.distribution(x)
    assert isinstance(q, torch.distributions.MultivariateNormal)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    # L(x): lower triangular, off-diagonal entries free, diagonal softplus + floor.
    with torch.no_grad():
        loc, raw, lower = guide.net(x)
    tril = q.scale_tril.detach()
    assert bool((tril.triu(1) == 0).all())
    torch.testing.assert_close(tril.diagonal(dim1=-2, dim2=-1), F.softplus(raw) + SCALE_FLOOR)
    rows, cols = torch.tril_indices(3, 3, -1)
    torch.testing.assert_close(tril[:, rows, cols], lower)
    assert float(tril[:, rows, cols].abs().min()) > 0  # it is not diagonal
    site = guide_site(guide, x, particles=7)
    assert site["value"].shape == (7, 5, 3)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), q.log_prob(site["value"]))


def test_full_mlp_encoder_starts_diagonal_and_handles_one_latent():
    pyro.set_rng_seed(0)
    x = torch.randn(4, 8)
    full = MLPEncoder(8, 3, hidden=(4,), covariance="full")
    tril = full.distribution(x).scale_tril
    torch.testing.assert_close(tril, torch.diag_embed(tril.diagonal(dim1=-2, dim2=-1)))
    one = MLPEncoder(8, 1, hidden=(4,), covariance="full").distribution(x)
    assert one.event_shape == (1,) and one.scale_tril.shape == (4, 1, 1)


def test_every_encoder_names_its_family():
    assert MLPEncoder(8, 2).family == "diag"
    assert MLPEncoder(8, 2, covariance="full").family == "full"
    assert LinearEncoder(8, 2).family == "diag"
    assert LinearEncoder(8, 2, covariance="full").family == "full"
    assert FlowEncoder(8, 2).family == FlowEncoder.family == "flow"
    assert DeltaEncoder(8, 2).family == "delta"
    with pytest.raises(ValueError, match="covariance"):
        MLPEncoder(8, 2, covariance="diagonal")


@pytest.mark.parametrize("jit", [True, False])
def test_full_mlp_encoder_trains_with_fit(binary_digits, jit, recwarn):
    pyro.set_rng_seed(0)
    model = VAE(64, 3, hidden=(16,))
    guide = MLPEncoder(64, 3, hidden=(16,), covariance="full")
    before = [p.detach().clone() for p in guide.parameters()]
    result = ppl_vae.fit(model, guide, binary_digits, epochs=10, batch_size=128, lr=1e-2,
                         seed=0, progress=False, jit=jit)
    assert not [w for w in recwarn if "plainly" in str(w.message)]  # traced, no fallback
    steps = math.ceil(len(binary_digits) / 128)
    first = torch.as_tensor(result.history[:steps])
    last = torch.as_tensor(result.history[-steps:])
    se = math.sqrt(first.var() / steps + last.var() / steps)
    assert float(last.mean() - first.mean()) > 5 * se
    # Every head moved, the off-diagonal one (started at zero) included.
    assert all(not torch.equal(a, b) for a, b in zip(before, guide.parameters(), strict=True))


@pytest.fixture(scope="module")
def rotated_encoders(rotated):
    """Diagonal and full linear-in-x MLP encoders fitted to the rotated PPCA.

    With ``hidden=()`` the MLP is affine in x, so each family holds its optimum: the
    exact posterior (full), or its best diagonal Gaussian (diag).
    """
    model, x = rotated
    return {cov: fit_to_fixed_model(model, MLPEncoder(10, 2, hidden=(), covariance=cov).double(), x)
            for cov in ("diag", "full")}


def test_full_covariance_encoder_closes_the_mean_field_gap(rotated, rotated_encoders):
    model, x = rotated
    exact = model.marginal().log_prob(x).detach()
    stats = {cov: ppl_vae.diagnostics(model, enc, x, 1000, seed=0)
             for cov, enc in rotated_encoders.items()}
    gap = {cov: exact - d.elbo for cov, d in stats.items()}
    se = {cov: float(g.std()) / math.sqrt(len(x)) for cov, g in gap.items()}
    # diag reaches (no further than) the closed-form mean-field gap; full reaches ~0.
    mf = mean_field_gap(model, x)
    assert mf > 0.5
    diag_gap = float(gap["diag"].mean())
    assert mf - 3 * se["diag"] < diag_gap < mf + OPTIMIZATION_SLACK + 3 * se["diag"]
    assert float(gap["full"].mean()) < OPTIMIZATION_SLACK + 3 * se["full"]
    # So the full encoder's ELBO is higher, datapoint by datapoint on average.
    diff = stats["full"].elbo - stats["diag"].elbo
    diff_se = float(diff.std()) / math.sqrt(len(x))
    assert float(diff.mean()) > 0.5 * mf and float(diff.mean()) > 10 * diff_se
    # ELBO <= log p(x) for every datapoint, up to its Monte Carlo error.
    for d in stats.values():
        assert bool((d.elbo <= exact + 4.5 * d.elbo_se).all())


def test_full_covariance_encoder_as_proposal_recovers_the_exact_log_marginal(
        rotated, rotated_encoders):
    model, x = rotated
    exact = model.marginal().log_prob(x).detach()
    d = ppl_vae.diagnostics(model, rotated_encoders["full"], x, 1000, seed=0)
    error = float((d.log_marginal - exact).mean())
    se = float(d.log_marginal_se.square().sum().sqrt()) / len(x)
    assert abs(error) < 4 * se, (error, se)
    assert float(d.khat.max()) < 0.7


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
