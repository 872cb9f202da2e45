"""AIS and BDMC against closed forms and quadrature, on models they were not written for."""

import importlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import ppl_vae
from ppl_vae import hmc
from ppl_vae.guides import ExactPosterior, LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE, FactorAnalysis
from ppl_vae.models.blocks import data_plate
from tests.conftest import draw

# The module, not the function ppl_vae.ais that shares its name.
ais_module = importlib.import_module("ppl_vae.ais")


def mean_and_se(errors: torch.Tensor) -> tuple[float, float]:
    return float(errors.mean()), float(errors.std() / math.sqrt(len(errors)))


@pytest.fixture(scope="module")
def ppca():
    pyro.set_rng_seed(0)
    model = PPCA(6, 2, sigma=0.5).double()
    with torch.no_grad():
        model.W.mul_(15.0)
        model.mu.normal_()
    return model, draw(model, 60, seed=1)


@pytest.mark.parametrize("family", [PPCA, FactorAnalysis])
def test_ais_from_the_prior_matches_the_closed_form(family):
    pyro.set_rng_seed(0)
    model = family(6, 2).double()
    with torch.no_grad():
        model.W.mul_(15.0)
        model.mu.normal_()
    x = draw(model, 60, seed=1)
    exact = model.marginal().log_prob(x).detach()
    result = ppl_vae.ais(model, x, num_steps=300, num_chains=8, seed=0, progress=False)
    mean, se = mean_and_se(result.log_marginal - exact)
    assert abs(mean) < 3 * se + 1e-3
    assert mean < se  # a stochastic lower bound: never above by more than noise


def test_ais_from_a_trained_encoder_matches_the_closed_form(ppca):
    model, x = ppca
    guide = LinearEncoder(6, 2).double()
    ppl_vae.fit(model, guide, x, num_steps=300, lr=3e-2, seed=0, progress=False,
                train_model=False)
    exact = model.marginal().log_prob(x).detach()
    result = ppl_vae.ais(model, x, proposal=guide, num_steps=50, num_chains=8, seed=0,
                         progress=False)
    mean, se = mean_and_se(result.log_marginal - exact)
    assert abs(mean) < 3 * se + 1e-4


def test_every_weight_is_exact_with_the_exact_posterior_as_proposal(ppca):
    model, x = ppca
    exact = model.marginal().log_prob(x).detach()
    result = ppl_vae.ais(model, x, proposal=ExactPosterior(model), num_steps=20,
                         num_chains=4, seed=0, progress=False)
    torch.testing.assert_close(result.log_weights, exact.expand(4, -1), rtol=0, atol=1e-9)


def test_one_hmc_kernel_leaves_a_gaussian_posterior_invariant(ppca):
    # Start 4000 chains at exact posterior draws for one datapoint; after 20 HMC
    # transitions at beta = 1 their mean and covariance must still be the posterior's.
    model, x = ppca
    x1 = x[:1]
    post = model.posterior(x1)
    chains = 4000
    space = ppl_vae.estimators.check_structure(model, x1)
    idx = torch.zeros(1, dtype=torch.long)
    block = next(iter(ppl_vae.seeding.blocks(idx)))
    noise = hmc.Noise([block], 0, chains, x1[block.rows], idx[block.rows])
    torch.manual_seed(0)
    u = post.sample((chains,)).detach().clone()
    target = hmc.Target(model, None, space, x1, idx, 1)
    eps = torch.full((1,), 0.05, dtype=torch.float64)
    here = target.values(u)
    for _ in range(20):
        here, _ = hmc.hmc_transition(target, here, 1.0, eps, 5, noise)
    sample = here.u[:, 0]
    mean, cov = post.mean.detach()[0], post.covariance_matrix.detach()[0]
    se = (cov.diagonal() / chains).sqrt()
    assert ((sample.mean(0) - mean).abs() < 4 * se).all()
    # Variance: se of a sample variance is about var * sqrt(2 / n).
    var_se = cov.diagonal() * math.sqrt(2 / chains)
    assert ((sample.var(0) - cov.diagonal()).abs() < 4 * var_se).all()


def test_bdmc_sandwiches_the_exact_value_and_shrinks_with_steps(ppca):
    model, _ = ppca
    x, latents = ppl_vae.sample_from_model(model, 60, seed=5)
    exact = model.marginal().log_prob(x).detach()
    widths = []
    for steps in (5, 50):
        result = ppl_vae.bdmc(model, x, latents, num_steps=steps, num_chains=4, seed=0,
                              progress=False)
        lower, lower_se = mean_and_se(result.lower - exact)
        upper, upper_se = mean_and_se(result.upper - exact)
        assert lower < 2 * lower_se and upper > -2 * upper_se
        widths.append(result.gap)
    assert widths[1] < widths[0] / 3


class Curved(PyroModule):
    """z ~ N(0, I_2), x ~ N((z1 + 0.5 z2^2, z2, tanh(2 z1)), 0.4^2 I): a bent posterior."""

    data_dim = 3

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("h", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0)
                            .to_event(1))
            loc = torch.stack([z[..., 0] + 0.5 * z[..., 1] ** 2, z[..., 1],
                               torch.tanh(2 * z[..., 0])], -1)
            return pyro.sample("x", dist.Normal(loc, 0.4).to_event(1), obs=x)


def curved_by_quadrature(x: torch.Tensor) -> torch.Tensor:
    """log p(x) of Curved on a 401 x 401 grid over [-6, 6]^2, written apart from it."""
    grid = torch.linspace(-6, 6, 401, dtype=torch.float64)
    z1, z2 = torch.meshgrid(grid, grid, indexing="ij")
    z1, z2 = z1.reshape(-1, 1), z2.reshape(-1, 1)
    log_prior = -0.5 * (z1**2 + z2**2) - math.log(2 * math.pi)
    means = [z1 + 0.5 * z2**2, z2, torch.tanh(2 * z1)]
    log_lik = sum(
        -0.5 * ((x[:, j] - m) / 0.4) ** 2 - math.log(0.4 * math.sqrt(2 * math.pi))
        for j, m in enumerate(means)
    )
    cell = float(grid[1] - grid[0]) ** 2
    return torch.logsumexp(log_prior + log_lik, 0) + math.log(cell)


def test_ais_matches_quadrature_on_a_curved_2d_posterior_and_is_not_biased_upward():
    x = ppl_vae.sample_from_model(Curved(), 80, seed=0)[0]
    exact = curved_by_quadrature(x)
    result = ppl_vae.ais(Curved(), x, num_steps=200, num_chains=8, seed=1, progress=False)
    mean, se = mean_and_se(result.log_marginal - exact)
    assert mean < se  # not positive beyond its standard error
    assert abs(mean) < 3 * se + 5e-3


class PositiveLatent(PyroModule):
    """rate ~ Gamma(3, 1) (scalar per datapoint), x | rate ~ Poisson(rate) on 4 counts."""

    data_dim = 4

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            rate = pyro.sample("rate", dist.Gamma(torch.tensor(3.0, dtype=torch.float64), 1.0))
            obs = dist.Poisson(rate[..., None].expand(*rate.shape, 4)).to_event(1)
            return pyro.sample("x", obs, obs=x)


def positive_by_quadrature(x: torch.Tensor) -> torch.Tensor:
    grid = torch.linspace(1e-4, 40, 200001, dtype=torch.float64)[:, None]
    log_prior = 2 * grid.log() - grid - math.lgamma(3)
    # [G, N]: four Poisson counts per datapoint, all with the same rate.
    log_lik = x.sum(-1) * grid.log() - 4 * grid - torch.lgamma(x + 1).sum(-1)
    return torch.logsumexp(log_prior + log_lik, 0) + math.log(float(grid[1] - grid[0]))


def test_ais_on_a_positive_latent_matches_quadrature():
    x = ppl_vae.sample_from_model(PositiveLatent(), 60, seed=0)[0]
    exact = positive_by_quadrature(x)
    result = ppl_vae.ais(PositiveLatent(), x, num_steps=100, num_chains=8, seed=0,
                         progress=False)
    mean, se = mean_and_se(result.log_marginal - exact)
    assert abs(mean) < 3 * se + 1e-3


class TwoSites(PyroModule):
    """h1 ~ N(0, I_2), h2 | h1 ~ N(A h1, 0.5^2 I_(2x3)) of shape (2, 3), x = B vec(h2) + noise.

    B is scaled down so the posterior is not much narrower than the prior in any
    direction, which keeps a 200-step AIS from the prior close to converged."""

    data_dim = 5

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.randn(6, 2, generator=g, dtype=torch.float64)
        self.B = 0.4 * torch.randn(5, 6, generator=g, dtype=torch.float64)

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            h1 = pyro.sample("h1", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0)
                             .to_event(1))
            loc = (h1 @ self.A.T).reshape(*h1.shape[:-1], 2, 3)
            h2 = pyro.sample("h2", dist.Normal(loc, 0.5).to_event(2))
            mean = h2.reshape(*h2.shape[:-2], 6) @ self.B.T
            return pyro.sample("x", dist.Normal(mean, 0.5).to_event(1), obs=x)

    def marginal(self):
        # x = B (A h1 + 0.5 e2) + 0.5 e3: Gaussian with covariance B (A A^T + 0.25 I) B^T + 0.25 I
        cov_h2 = self.A @ self.A.T + 0.25 * torch.eye(6, dtype=torch.float64)
        cov = self.B @ cov_h2 @ self.B.T + 0.25 * torch.eye(5, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(torch.zeros(5, dtype=torch.float64), cov)


def test_ais_on_two_sites_with_a_matrix_latent_matches_the_closed_form():
    model = TwoSites()
    x = ppl_vae.sample_from_model(model, 60, seed=0)[0]
    exact = model.marginal().log_prob(x)
    # The joint prior of (h1, h2) is strongly correlated: longer trajectories and more
    # chains than for an isotropic posterior (at 8 chains x 10 leapfrog steps the
    # estimate is still 0.1 nats low after 1000 steps).
    result = ppl_vae.ais(model, x, num_steps=200, num_chains=16, leapfrog_steps=20, seed=0,
                         progress=False)
    mean, se = mean_and_se(result.log_marginal - exact)
    assert abs(mean) < 3 * se + 5e-3


def test_a_row_depends_only_on_the_seed_and_its_index(ppca, monkeypatch):
    model, x = ppca
    whole = ppl_vae.ais(model, x[:40], num_steps=10, num_chains=4, seed=3, progress=False)
    monkeypatch.setattr(ais_module, "CHUNK_ELEMENTS", 200)  # many small chunks
    first = ppl_vae.ais(model, x[:23], num_steps=10, num_chains=4, seed=3, progress=False)
    second = ppl_vae.ais(model, x[23:40], idx=torch.arange(23, 40), num_data=40,
                         num_steps=10, num_chains=4, seed=3, progress=False)
    torch.testing.assert_close(torch.cat([first.log_weights, second.log_weights], 1),
                               whole.log_weights, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "num_steps"),
    ({"num_chains": 0}, "num_chains"),
    ({"leapfrog_steps": 0}, "leapfrog_steps"),
    ({"schedule": [0.0, 0.7, 0.5, 1.0]}, "non-decreasing"),
    ({"schedule": [0.1, 0.5, 1.0]}, "from 0 to 1"),
    ({"schedule": "cosine"}, "schedule"),
    ({"step_size": -1.0}, "step_size"),
    ({"seed": -3}, "seed"),
])
def test_bad_settings_are_refused_before_any_work(ppca, kwargs, match):
    model, x = ppca
    with pytest.raises(ValueError, match=match):
        ppl_vae.ais(model, x, progress=False, **kwargs)


def test_bdmc_refuses_latents_that_miss_a_site_or_have_the_wrong_shape(ppca):
    model, x = ppca
    with pytest.raises(ValueError, match="lacks"):
        ppl_vae.bdmc(model, x, {"w": torch.zeros(len(x), 2)}, progress=False)
    with pytest.raises(ValueError, match="shape"):
        ppl_vae.bdmc(model, x, {"z": torch.zeros(len(x), 3)}, progress=False)


def test_the_sigmoid_schedule_runs_from_exactly_zero_to_one():
    betas = ais_module.schedule_betas("sigmoid", 100)
    assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()


def small_vae():
    torch.manual_seed(0)
    model, guide = VAE(64, 3, hidden=(32,)), MLPEncoder(64, 3, hidden=(32,))
    x = ppl_vae.load_dataset("digits", split="test", binarize="static", limit=20)
    return model, guide, x


def test_the_traced_potential_gives_the_plain_potentials_numbers():
    model, guide, x = small_vae()
    runs = [ppl_vae.ais(model, x, proposal=guide, num_steps=15, num_chains=3, seed=1,
                        progress=False, jit=jit) for jit in (True, False)]
    torch.testing.assert_close(runs[0].log_weights, runs[1].log_weights, rtol=1e-5,
                               atol=1e-4)
    assert all(p.requires_grad for p in (*model.parameters(), *guide.parameters()))


class NoisyVAE(VAE):
    """A model whose density has a random op: a trace would freeze one draw of it."""

    def forward(self, x, idx=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim),
                                             1.0).to_event(1))
            logits = self.decoder(z) + 0.1 * torch.randn(())
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def test_a_potential_the_trace_cannot_hold_runs_plainly_with_a_warning():
    torch.manual_seed(0)
    model = NoisyVAE(64, 3, hidden=(32,))
    x = ppl_vae.load_dataset("digits", split="test", binarize="static", limit=20)
    with pytest.warns(UserWarning, match="traced AIS potential differs"):
        ppl_vae.ais(model, x, num_steps=3, num_chains=2, seed=1, progress=False)


@pytest.mark.parametrize("case", ["two_sites", "positive"])
def test_ais_from_a_local_guide_on_other_latents_matches_the_exact_value(case):
    # A local guide's joint_distribution is a fixed q: AIS keeps the gradients of log q
    # and log p apart and hands each transition's end on (ppl_vae.hmc.Point), here on two
    # sites with a matrix latent and on a positive latent (a log transform's Jacobian in
    # q). A wrong density handed on biases the weights and fails here; a wrong gradient
    # only slows HMC down, which tests/ppl_vae/test_hmc_points.py catches.
    model = TwoSites() if case == "two_sites" else PositiveLatent()
    x = ppl_vae.sample_from_model(model, 40, seed=1)[0]
    exact = model.marginal().log_prob(x) if case == "two_sites" else positive_by_quadrature(x)
    local = ppl_vae.fit_local(model, x, "diag", steps=300, progress=False, seed=0)
    assert callable(getattr(local, "joint_distribution", None))
    result = ppl_vae.ais(model, x, proposal=local, num_steps=100, num_chains=8, seed=0,
                         progress=False)
    mean, se = mean_and_se(result.log_marginal - exact)
    assert abs(mean) < 3 * se + 5e-3
