"""Gradient estimators (issue 22, part 2): sticking the landing and DReG, checked
against the standard reparameterized gradients on PPCA, whose posterior is known.

Unbiasedness: over many seeded draws the mean gradient of each estimator equals the
standard one's, coordinate by coordinate, within 4 standard errors of the paired
difference. Variance: at the exact posterior the STL and DReG guide gradients are zero
for every draw (log p(x, z) - log q(z) is constant in z), and near it they vary less.
"""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule
from torch import nn

import ppl_vae
from ppl_vae.gradients import DReG, StickingTheLanding
from ppl_vae.guides import DeltaEncoder, FlowEncoder, LinearEncoder
from ppl_vae.guides.latent_space import LatentSpace
from ppl_vae.guides.local import LocalFull
from ppl_vae.models import PPCA
from ppl_vae.models.blocks import data_plate
from ppl_vae.objectives import IWAE, Warmup
from ppl_vae.settings import module_local

N, D, K_LATENT = 8, 5, 2
# Draws of the gradient for the statistical tests: CALLS calls on the data repeated
# REPLICAS times. Each datapoint's gradient comes from its own draws, so one call's
# gradient is the sum of REPLICAS independent draws of the N-point gradient.
CALLS, REPLICAS = 40, 10


def ppca(seed: int = 0, orthogonal: bool = False) -> tuple[PPCA, torch.Tensor]:
    """A float64 PPCA with random loadings and N points drawn from it."""
    torch.manual_seed(seed)
    model = PPCA(D, K_LATENT, sigma=0.7).double()
    with torch.no_grad():
        W = torch.randn(D, K_LATENT, dtype=torch.double)
        if orthogonal:  # orthogonal columns: a diagonal posterior covariance
            W = torch.linalg.qr(W).Q * torch.tensor([2.0, 1.0], dtype=torch.double)
        model.W.copy_(W)
        model.mu.normal_()
        x = model.marginal().sample((N,))
    return model, x


def posterior_map(model):
    """(A, b, L): p(z | x) = N(x A + b, L L^T) for the PPCA ``model``."""
    with torch.no_grad():
        W_over_psi = model.W / model.noise_variance().unsqueeze(-1)
        cov = model.posterior(model.mu[None]).covariance_matrix[0]
        A = W_over_psi @ cov
        return A, -model.mu @ A, torch.linalg.cholesky(cov)


def softplus_inverse(y):
    return y + torch.log(-torch.expm1(-y))


def exact_encoder(model) -> LinearEncoder:
    """A full-covariance LinearEncoder set to the exact posterior of ``model``."""
    guide = LinearEncoder(D, K_LATENT, covariance="full").double()
    A, b, L = posterior_map(model)
    with torch.no_grad():
        guide.loc.weight.copy_(A.T)
        guide.loc.bias.copy_(b)
        diagonal = softplus_inverse(L.diagonal() * F.softplus(torch.ones((), dtype=L.dtype)))
        guide.raw_scale.copy_(L.tril(-1) + torch.diag(diagonal))
    return guide


def perturbed(guide, size: float, seed: int = 1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(size * torch.randn_like(p))
    return guide


def replicated_draws(loss, model, guide, x, calls: int = CALLS, seed: int = 0):
    """Means of REPLICAS independent gradient draws of the N-point loss, one per call:
    (guide's, model's), shapes (calls, P). Their covariance is the draws' / REPLICAS."""
    guide_grads, model_grads = gradient_draws(loss, model, guide, x.repeat(REPLICAS, 1),
                                              calls, seed)
    return guide_grads / REPLICAS, model_grads / REPLICAS


def variance(draws):
    """Trace of the covariance of one draw, from replicated_draws' means."""
    return draws.var(0).sum() * REPLICAS


@module_local
def gradient_draws(loss, model, guide, x, draws: int, seed: int = 0):
    """Gradients of ``draws`` seeded calls: (guide's, model's), shapes (draws, P)."""
    loss_fn = loss(model, guide)
    idx = torch.arange(len(x))
    guide_grads, model_grads = [], []
    for draw in range(draws):
        torch.manual_seed(seed + draw)
        loss_fn.zero_grad(set_to_none=False)
        loss_fn(x, idx=idx, num_data=len(x)).backward()
        guide_grads.append(_flat_grads(guide))
        model_grads.append(_flat_grads(model))
    return torch.stack(guide_grads), torch.stack(model_grads)


def _flat_grads(module):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(),
                      dtype=p.dtype) for p in module.parameters()])


def z_scores(new, standard):
    """Mean paired difference over its standard error, per coordinate that the
    standard gradient moves (a structural zero, e.g. the upper triangle of a Cholesky
    factor, must be zero in both)."""
    live = standard.abs().amax(0) > 0
    assert (new[:, ~live] == 0).all()
    diff = (new - standard)[:, live]
    return diff.mean(0) / (diff.std(0) / math.sqrt(len(diff)))


def elbo(k: int = 1):
    if k == 1:
        return Trace_ELBO(max_plate_nesting=1)
    return Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)


# --- zero variance at the exact posterior -------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_stl_guide_gradient_is_zero_at_the_exact_posterior(k):
    model, x = ppca()
    guide = exact_encoder(model)
    stl, _ = gradient_draws(StickingTheLanding(k), model, guide, x, draws=5)
    standard, _ = gradient_draws(elbo(k), model, guide, x, draws=5)
    assert stl.abs().max() < 1e-10
    # The standard gradient is the score term it drops: far from zero in every draw.
    assert (standard.norm(dim=1) > 1.0).all()


def test_dreg_guide_gradient_is_zero_at_the_exact_posterior():
    model, x = ppca()
    guide = exact_encoder(model)
    dreg, _ = gradient_draws(DReG(10), model, guide, x, draws=5)
    standard, _ = gradient_draws(IWAE(10), model, guide, x, draws=5)
    assert dreg.abs().max() < 1e-10
    assert (standard.norm(dim=1) > 1.0).all()


def test_stl_through_a_flow_is_zero_at_the_exact_posterior():
    """The flow's log q is its inverse at z: the coupling layers' parameters get the
    path gradient only, zero at the posterior (identity couplings, a Gaussian base)."""
    model, x = ppca(orthogonal=True)
    A, b, L = posterior_map(model)
    assert torch.allclose(L, torch.diag(L.diagonal()), atol=1e-12)
    guide = FlowEncoder(D, K_LATENT, hidden=(), num_flows=2).double()
    head = guide.net.layers[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:K_LATENT].copy_(A.T)
        head.bias.copy_(torch.cat([b, softplus_inverse(L.diagonal() - 1e-4)]))
    stl, _ = gradient_draws(StickingTheLanding(2), model, guide, x, draws=3)
    standard, _ = gradient_draws(elbo(2), model, guide, x, draws=3)
    assert stl.abs().max() < 1e-9
    assert (standard.norm(dim=1) > 1.0).all()


class PositivePPCA(PyroModule):
    """z ~ LogNormal(0, I), x | z ~ N(W log z + mu, sigma^2 I): PPCA in u = log z, so
    its posterior in u is PPCA's, and q(z) carries the Jacobian of z = exp(u)."""

    def __init__(self, ppca_model):
        super().__init__()
        self.W = nn.Parameter(ppca_model.W.detach().clone())
        self.mu = nn.Parameter(ppca_model.mu.detach().clone())
        self.sigma = float(ppca_model.sigma.detach())

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.LogNormal(self.W.new_zeros(K_LATENT), 1.0).to_event(1))
            loc = z.log() @ self.W.T + self.mu
            return pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=x)


def test_stl_with_a_local_guide_on_a_positive_latent_is_zero_at_the_posterior():
    """A local guide draws u as an auxiliary site and hands z = exp(u) to the model
    through a Delta carrying -log|dz/du|: log q must be the density of z itself."""
    linear, x = ppca()
    model = PositivePPCA(linear)
    posterior = linear.posterior(x)
    space = LatentSpace.of(model, x)
    guide = LocalFull.from_gaussian(posterior.loc, posterior.scale_tril, space)
    stl, _ = gradient_draws(StickingTheLanding(2), model, guide, x, draws=3)
    standard, _ = gradient_draws(elbo(2), model, guide, x, draws=3)
    assert stl.abs().max() < 1e-9
    assert (standard.norm(dim=1) > 1.0).all()


# --- unbiasedness ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
def test_stl_is_unbiased_for_the_elbo(k):
    model, x = ppca()
    guide = perturbed(exact_encoder(model), 0.3)
    stl_guide, stl_model = replicated_draws(StickingTheLanding(k), model, guide, x)
    guide_grads, model_grads = replicated_draws(elbo(k), model, guide, x)
    assert z_scores(stl_guide, guide_grads).abs().max() < 4
    # The model's gradient is the same estimate, draw for draw (the same z).
    torch.testing.assert_close(stl_model, model_grads, rtol=1e-9, atol=1e-9)


def test_stl_under_kl_warmup_is_unbiased_for_the_weighted_elbo():
    model, x = ppca()
    guide = perturbed(exact_encoder(model), 0.3)
    warm = Warmup(model, guide, steps=4)
    warm.set_step(1)  # beta = 1/2
    stl_guide, _ = replicated_draws(StickingTheLanding(2), warm.model, warm.guide, x)
    guide_grads, _ = replicated_draws(elbo(2), warm.model, warm.guide, x)
    assert z_scores(stl_guide, guide_grads).abs().max() < 4


@pytest.mark.parametrize("k", [5, 20])
def test_dreg_is_unbiased_for_the_iwae_bound(k):
    model, x = ppca()
    guide = perturbed(exact_encoder(model), 0.5)
    dreg_guide, dreg_model = replicated_draws(DReG(k), model, guide, x)
    iwae_guide, iwae_model = replicated_draws(IWAE(k), model, guide, x)
    assert z_scores(dreg_guide, iwae_guide).abs().max() < 4
    torch.testing.assert_close(dreg_model, iwae_model, rtol=1e-9, atol=1e-9)


def test_the_z_test_sees_the_bias_of_stl_weights_in_the_iwae_bound():
    """The check has power: the IWAE-STL guide gradient, sum_k w~_k d log w_k / d z_k
    dz_k / dphi (STL's w~ weights where DReG has w~^2), is biased, and fails it."""
    model, x = ppca()
    guide = perturbed(exact_encoder(model), 0.5)
    biased, _ = replicated_draws(_IWAEStoppedQ(20), model, guide, x)
    iwae_guide, _ = replicated_draws(IWAE(20), model, guide, x)
    assert z_scores(biased, iwae_guide).abs().max() > 4


class _IWAEStoppedQ(DReG):
    """The IWAE bound with log q's parameters stopped and nothing else: biased."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        from ppl_vae.gradients import _particles_trace, _stopped_log_q
        from ppl_vae.objectives import _subsample_scale, _weighted_log_density

        k = self.num_particles
        guide_trace = _particles_trace(guide, k, args, kwargs)
        model_trace = _particles_trace(model, k, args, kwargs, guide_trace)
        scale = _subsample_scale(model_trace)
        log_q = _stopped_log_q(model, guide, guide_trace, k, args, kwargs, scale)
        log_w = _weighted_log_density(model_trace, scale) - log_q
        return -(torch.logsumexp(log_w, 0) - math.log(k)).sum() * scale


# --- lower variance -------------------------------------------------------------------


def test_stl_has_lower_guide_gradient_variance_near_the_posterior():
    model, x = ppca()
    guide = perturbed(exact_encoder(model), 0.05)
    stl, _ = replicated_draws(StickingTheLanding(1), model, guide, x)
    standard, _ = replicated_draws(elbo(1), model, guide, x)
    # A trace of a covariance from 40 calls has a relative SE of about 20% (less
    # summed over 16 coordinates); the ratio measured is about 85, so 10 is far below.
    assert variance(standard) / variance(stl) > 10


@pytest.mark.parametrize("k", [10, 50])
def test_dreg_has_lower_guide_gradient_variance_than_iwae_near_the_posterior(k):
    """Measured ratios IWAE / DReG: 3.3 (k=10) and 2.6 (k=50) with the guide perturbed
    by 0.1 from the posterior; about 30 and 54 at 0.05. Farther off (0.3) DReG's
    w~^2 weights make it the noisier one on this model (0.8 and 0.6): the gain is
    where the encoder is near its optimum, as a trained one is."""
    model, x = ppca()
    guide = perturbed(exact_encoder(model), 0.1)
    dreg, _ = replicated_draws(DReG(k), model, guide, x, calls=60)
    iwae, _ = replicated_draws(IWAE(k), model, guide, x, calls=60)
    assert variance(iwae) / variance(dreg) > 1.5


# --- fit ------------------------------------------------------------------------------


def test_fit_with_stl_reaches_the_ppca_maximum_likelihood_as_reparam_does():
    torch.manual_seed(3)
    truth = PPCA(D, K_LATENT, sigma=0.5)
    with torch.no_grad():
        truth.W.normal_()
    x = truth.marginal().sample((400,))
    best = PPCA.from_data(x, K_LATENT).score(x)
    reached = {}
    for gradient in ("reparam", "stl"):
        torch.manual_seed(0)
        model, guide = PPCA(D, K_LATENT), LinearEncoder(D, K_LATENT, covariance="full")
        ppl_vae.fit(model, guide, x, epochs=150, batch_size=100, lr=2e-2, seed=0,
                    gradient=gradient, lr_schedule="cosine", progress=False)
        with torch.no_grad():
            reached[gradient] = float(model.marginal().log_prob(x).mean())
    assert best - 0.02 < reached["stl"] <= best + 1e-4
    assert reached["stl"] > reached["reparam"] - 0.01


@pytest.mark.parametrize("gradient, objective, k", [("stl", "elbo", 2), ("dreg", "iwae", 4)])
def test_the_traced_loss_gives_the_plain_loss_steps(gradient, objective, k):
    model, x = ppca()
    histories, states = [], []
    for jit in (True, False):
        fitted_model, guide = PPCA(D, K_LATENT).double(), LinearEncoder(D, K_LATENT).double()
        fitted_model.load_state_dict(model.state_dict())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ppl_vae.fit(fitted_model, guide, x, num_steps=15, batch_size=4, lr=1e-2,
                                 seed=1, jit=jit, gradient=gradient, objective=objective,
                                 num_particles=k, progress=False)
        # A loss that could not be traced, or differed from the plain one, would warn.
        assert not [w for w in caught if "trace" in str(w.message)]
        histories.append(result.history)
        states.append({**fitted_model.state_dict(), **guide.state_dict()})
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-7)
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=1e-6, atol=1e-9)


def test_fit_with_dreg_and_a_flow_trains():
    model, x = ppca()
    guide = FlowEncoder(D, K_LATENT, hidden=(16,), num_flows=2).double()
    result = ppl_vae.fit(model, guide, x, num_steps=30, lr=1e-2, seed=0, gradient="dreg",
                         objective="iwae", num_particles=5, progress=False)
    assert np.isfinite(result.history).all()
    # The history is the IWAE bound itself, below the exact log p(x).
    assert result.history[-5:].mean() < model.score(x) + 0.5


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"gradient": "score"}, "gradient must be one of"),
    ({"gradient": "stl", "objective": "iwae"}, "objective='elbo'"),
    ({"gradient": "dreg"}, "objective='iwae'"),
    ({"gradient": "dreg", "objective": "iwae", "kl_warmup": 5}, "kl_warmup=5"),
    ({"gradient": "stl", "loss": Trace_ELBO()}, "loss="),
])
def test_bad_gradient_options_are_refused_before_any_work(kwargs, match):
    model, x = ppca()
    guide = LinearEncoder(D, K_LATENT).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        ppl_vae.fit(model, guide, x, num_steps=1, progress=False, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _ScoreOnlyGuide(PyroModule):
    """A guide whose draws have no reparameterization (Bernoulli codes)."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(K_LATENT, dtype=torch.double))

    def forward(self, x, idx=None, num_data=None):
        q = dist.Bernoulli(logits=self.logit.expand(len(x), -1)).to_event(1)
        with data_plate(x, idx, num_data):
            return pyro.sample("z", q)


@pytest.mark.parametrize("gradient, objective", [("stl", "elbo"), ("dreg", "iwae")])
def test_guides_without_rsample_or_density_are_refused(gradient, objective):
    model, x = ppca()
    for guide, match in [(_ScoreOnlyGuide(), "has no rsample"),
                         (DeltaEncoder(D, K_LATENT, hidden=(4,)).double(), "point mass")]:
        with pytest.raises(ValueError, match=match):
            ppl_vae.fit(model, guide, x, num_steps=1, progress=False, gradient=gradient,
                        objective=objective)


# --- command line ---------------------------------------------------------------------


def test_the_cli_passes_gradient_to_fit_and_keeps_it_in_the_checkpoint(tmp_path, monkeypatch):
    from ppl_vae import cli
    from tests.ppl_vae.test_cli import TINY

    seen = {}
    fit = cli.ppl_vae.fit

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return fit(*args, **kwargs)

    monkeypatch.setattr(cli.ppl_vae, "fit", spy)
    cli.run(["fit", *TINY, "--objective", "iwae", "--particles", "3", "--gradient", "dreg",
             "--out", str(tmp_path)])
    assert (seen["gradient"], seen["objective"]) == ("dreg", "iwae")
    config = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert config["gradient"] == "dreg"


@pytest.mark.parametrize("argv, expected", [
    (["--gradient", "dreg"], "--gradient dreg is an estimator for --objective iwae"),
    (["--gradient", "stl", "--objective", "iwae"], "--objective elbo"),
    (["--gradient", "dreg", "--objective", "iwae", "--kl-warmup", "5"], "--kl-warmup 5"),
])
def test_the_cli_refuses_a_gradient_that_does_not_fit_before_training(tmp_path, capsys,
                                                                      monkeypatch, argv,
                                                                      expected):
    from ppl_vae import cli
    from tests.ppl_vae.test_cli import fails_in_one_line

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(cli.training, "train", refuse)
    fails_in_one_line(["fit", *argv, "--quiet", "--out", str(tmp_path)], capsys, expected)
