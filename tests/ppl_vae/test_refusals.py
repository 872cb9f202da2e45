"""What the estimators refuse, and what they score correctly, on models they were not
written for (issue 9, part 3) — and seeded draws that depend only on (seed, row)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import ppl_vae
from ppl_vae.models.blocks import data_plate
from tests.conftest import draw


class TwoLatents(PyroModule):
    """a ~ N(0, 1), b ~ N(0, 1), x ~ N(a + 2 b, 0.5^2) in 1-D: p(x) = N(0, 5.25)."""

    data_dim = 1

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            a = pyro.sample("a", dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0)
                            .to_event(1))
            b = pyro.sample("b", dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0)
                            .to_event(1))
            return pyro.sample("x", dist.Normal(a + 2 * b, 0.5).to_event(1), obs=x)


class OnlyA(PyroModule):
    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            pyro.sample("a", dist.Normal(x * 0.2, 1.0).to_event(1))


def test_a_guide_missing_a_latent_is_refused_by_every_estimator():
    x = torch.randn(5, 1, dtype=torch.float64)
    for estimator in (ppl_vae.log_weights, ppl_vae.log_marginal, ppl_vae.elbo,
                      ppl_vae.diagnostics):
        with pytest.raises(ValueError, match=r"\['b'\] have no site in the guide"):
            estimator(TwoLatents(), OnlyA(), x, 10)


@pytest.mark.parametrize("call", [
    lambda x: ppl_vae.fit(TwoLatents(), None, x, num_steps=2, progress=False),
    lambda x: ppl_vae.log_marginal(TwoLatents(), None, x, 10),
    lambda x: ppl_vae.elbo(TwoLatents(), None, x, 10),
    lambda x: ppl_vae.elbo_surgery(TwoLatents(), None, x),
    lambda x: ppl_vae.gaps(TwoLatents(), None, x, progress=False),
    lambda x: ppl_vae.refine(TwoLatents(), None, x, steps=2, progress=False),
], ids=["fit", "log_marginal", "elbo", "elbo_surgery", "gaps", "refine"])
def test_a_missing_guide_is_refused_in_words(call):
    # Each had failed inside Pyro: "get_trace() takes 1 positional argument but 4 were given".
    with pytest.raises(ValueError, match="guide is None: this call needs a guide"):
        call(torch.randn(5, 1, dtype=torch.float64))


def test_a_missing_guide_points_the_estimators_to_the_prior_proposal():
    x = torch.randn(5, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="or proposal='prior'"):
        ppl_vae.log_weights(TwoLatents(), None, x, 10)
    exact = torch.distributions.Normal(0.0, 5.25 ** 0.5).log_prob(x[:, 0])
    lw = ppl_vae.log_weights(TwoLatents(), None, x, 4000, proposal="prior", seed=0)
    w = (lw - lw.max(0).values).exp()
    se = w.std(0) / (math.sqrt(len(w)) * w.mean(0))  # delta method for log mean w
    estimate = ppl_vae.log_marginal(TwoLatents(), None, x, 4000, proposal="prior", seed=0)
    assert (estimate - exact).abs().max() < 4 * se.max()


class ExtraSite(PyroModule):
    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            for name in ("a", "b", "c"):
                pyro.sample(name, dist.Normal(torch.zeros_like(x), 1.0).to_event(1))


def test_a_guide_site_the_model_lacks_is_refused():
    x = torch.randn(5, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\['c'\] that are\s+not latent sites"):
        ppl_vae.log_marginal(TwoLatents(), ExtraSite(), x, 10)


class GammaPoisson(PyroModule):
    """rate ~ Gamma(3, 1) with event shape (1,), x | rate ~ Poisson(rate), 3 counts."""

    data_dim = 3

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            prior = dist.Gamma(torch.full((1,), 3.0, dtype=torch.float64), 1.0).to_event(1)
            rate = pyro.sample("rate", prior)
            return pyro.sample("x", dist.Poisson(rate.expand(*rate.shape[:-1], 3))
                               .to_event(1), obs=x)


class NormalOnRate(PyroModule):
    """N(2, 1.5^2): about 9% of its draws are negative, outside the Gamma's support."""

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            loc = torch.full((len(x), 1), 2.0, dtype=torch.float64)
            pyro.sample("rate", dist.Normal(loc, 1.5).to_event(1))


def gamma_poisson_by_quadrature(x):
    grid = torch.linspace(1e-5, 40, 400001, dtype=torch.float64)[:, None]
    log_prior = 2 * grid.log() - grid - math.lgamma(3)
    log_lik = x.sum(-1) * grid.log() - 3 * grid - torch.lgamma(x + 1).sum(-1)
    return torch.logsumexp(log_prior + log_lik, 0) + math.log(float(grid[1] - grid[0]))


def test_draws_off_a_latents_support_get_zero_weight_and_the_estimate_stays_right():
    x = ppl_vae.sample_from_model(GammaPoisson(), 20, seed=0)[0]
    lw = ppl_vae.log_weights(GammaPoisson(), NormalOnRate(), x, 20000, seed=0)
    assert torch.isneginf(lw).any()  # the negative draws
    assert torch.isneginf(ppl_vae.elbo(GammaPoisson(), NormalOnRate(), x, 200, seed=0)).all()
    d = ppl_vae.summarize_log_weights(lw)
    exact = gamma_poisson_by_quadrature(x)
    error = d.log_marginal - exact
    assert (error.abs() < 4 * d.log_marginal_se).all()


class NoEventDims(PyroModule):
    data_dim = 2

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))  # forgot .to_event(1)
            loc = z.sum(-1, keepdim=True).expand(*z.shape[:-1], 2)
            return pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def test_a_latent_without_event_dims_is_refused_up_front():
    with pytest.raises(ValueError, match=r"(?s)\bz\b.*to_event"):
        ppl_vae.log_marginal(NoEventDims(), None, torch.zeros(4, 2), 5, proposal="prior")
    with pytest.raises(ValueError, match=r"(?s)\bz\b.*to_event"):
        ppl_vae.ais(NoEventDims(), torch.zeros(4, 2), num_steps=2, progress=False)


def test_one_sample_gives_estimates_with_nan_errors(ppca_truth):
    model, x = ppca_truth
    guide = ppl_vae.guides.ExactPosterior(model)
    d = ppl_vae.diagnostics(model, guide, x[:5], num_samples=1)
    torch.testing.assert_close(d.log_marginal, model.marginal().log_prob(x[:5]).detach())
    assert torch.isnan(d.log_marginal_se).all() and torch.isnan(d.khat).all()
    assert (d.ess == 1).all()


def test_log_marginal_streams_over_k_with_an_exact_running_logsumexp(ppca_truth):
    model, x = ppca_truth
    guide = ppl_vae.guides.LinearEncoder(10, 2).double()
    k = 3 * ppl_vae.estimators.sample_block(x.shape[1]) + 5
    lw = ppl_vae.log_weights(model, guide, x[:20], k, seed=4)
    streamed = ppl_vae.log_marginal(model, guide, x[:20], k, seed=4)
    torch.testing.assert_close(streamed, torch.logsumexp(lw, 0) - math.log(k))
    torch.testing.assert_close(ppl_vae.elbo(model, guide, x[:20], k, seed=4), lw.mean(0))


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "7", True])
def test_a_bad_seed_is_a_value_error(ppca_truth, seed):
    model, x = ppca_truth
    with pytest.raises(ValueError, match="seed"):
        ppl_vae.log_marginal(model, ppl_vae.guides.ExactPosterior(model), x[:3], 2, seed=seed)


def test_a_seeded_row_depends_only_on_the_seed_and_its_index():
    pyro.set_rng_seed(0)
    model = ppl_vae.models.PPCA(5, 2).double()
    x = draw(model, 50, seed=1)
    guide = ppl_vae.guides.LinearEncoder(5, 2).double()
    whole = ppl_vae.log_weights(model, guide, x, 300, seed=9)
    first = ppl_vae.log_weights(model, guide, x[:23], 300, seed=9)
    second = ppl_vae.log_weights(model, guide, x[23:], 300, seed=9,
                                 idx=torch.arange(23, 50), num_data=50)
    assert torch.equal(torch.cat([first, second], 1), whole)
    # Rows in another order, and a row twice: each column follows its own index.
    order = torch.tensor([40, 3, 3, 17])
    shuffled = ppl_vae.log_weights(model, guide, x[order], 300, seed=9, idx=order, num_data=50)
    assert torch.equal(shuffled, whole[:, order])


def test_gaps_with_one_sample_reports_nan_errors_instead_of_failing(ppca_truth):
    model, x = ppca_truth
    guide = ppl_vae.guides.LinearEncoder(10, 2).double()
    report = ppl_vae.gaps(model, guide, x[:20], num_samples=1, local_steps=20, seed=0,
                          progress=False)
    assert math.isnan(report.khat_mean)
    assert torch.isnan(report.per_datapoint["elbo_local_se"]).all()
    torch.testing.assert_close(report.per_datapoint["log_px"],
                               model.marginal().log_prob(x[:20]).detach())
