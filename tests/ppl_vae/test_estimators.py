import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import ppl_vae
from ppl_vae.estimators import sample_block
from ppl_vae.guides import ExactPosterior, LinearEncoder
from ppl_vae.models import PPCA


@pytest.fixture(scope="module")
def mle(ppca_truth):
    _, x = ppca_truth
    return PPCA.from_data(x, 2), x


@pytest.fixture(scope="module")
def trained_encoder(mle):
    model, x = mle
    guide = LinearEncoder(10, 2).double()
    ppl_vae.fit(model, guide, x, num_steps=500, lr=3e-2, seed=0, progress=False, train_model=False)
    return guide


@pytest.mark.parametrize("family", ["ppca_truth", "fa_truth"])
@pytest.mark.parametrize("num_samples", [1, 100])
def test_exact_posterior_gives_exact_log_marginal(family, num_samples, request):
    model, x = request.getfixturevalue(family)
    estimate = ppl_vae.log_marginal(model, ExactPosterior(model), x, num_samples=num_samples)
    exact = model.marginal().log_prob(x).detach()
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-5)


def test_exact_posterior_weights_have_zero_variance(mle):
    model, x = mle
    d = ppl_vae.diagnostics(model, ExactPosterior(model), x[:20], num_samples=50)
    assert d.log_marginal_se.max() < 1e-6
    torch.testing.assert_close(d.ess, torch.full_like(d.ess, 50.0))


def test_blocks_are_assembled_per_datapoint(mle):
    # Scattered row indices make partial, padded blocks, and K > sample_block(D) splits the
    # samples; with exact weights any misplaced cell shows up as another row's log p(x).
    model, x = mle
    idx = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:37]
    k = sample_block(x.shape[1]) + 11
    lw = ppl_vae.log_weights(model, ExactPosterior(model), x[:37], k, idx=idx, num_data=500)
    exact = model.marginal().log_prob(x[:37]).detach()
    torch.testing.assert_close(lw, exact.expand(k, -1), rtol=0, atol=1e-9)


def test_elbo_is_below_log_marginal_for_every_datapoint(mle, trained_encoder):
    model, x = mle
    x = x[:200]
    lw = ppl_vae.log_weights(model, trained_encoder, x, 2000, seed=0)
    d = ppl_vae.summarize_log_weights(lw)
    exact = model.marginal().log_prob(x).detach()
    assert (d.elbo <= exact + 4 * d.elbo_se).all()
    assert (d.elbo <= d.log_marginal).all()  # Jensen, on the same weights
    gap = exact - d.elbo  # the KL to the true posterior, > 0 on average
    assert gap.mean() > 4 * gap.std() / math.sqrt(len(gap))


def test_log_marginal_with_a_trained_encoder_is_within_three_se(mle, trained_encoder):
    model, x = mle
    x = x[:20]
    d = ppl_vae.diagnostics(model, trained_encoder, x, num_samples=5000, seed=1)
    exact = model.marginal().log_prob(x).detach()
    err = d.log_marginal - exact
    # The mean error within 3 se of the mean; every datapoint within 4 se (20 points:
    # a 4-se excursion anywhere has probability ~1e-3 if the estimator is right).
    assert err.mean().abs() < 3 * d.log_marginal_se.square().sum().sqrt() / len(err)
    assert (err.abs() < 4 * d.log_marginal_se).all()
    assert (d.khat < 0.5).all()
    assert (d.ess > 1000).all()


def test_importance_sampling_bias_shrinks_with_k(mle):
    # An untrained encoder is a poor proposal, so the bias at small K is large. Biases
    # are compared on the same datapoints, so the se is that of paired differences.
    model, x = mle
    x = x[:200]
    guide = LinearEncoder(10, 2).double()
    exact = model.marginal().log_prob(x).detach()
    errors = [
        exact - ppl_vae.log_marginal(model, guide, x, num_samples=k, seed=k)
        for k in (1, 10, 100, 1000)
    ]
    for worse, better in zip(errors, errors[1:], strict=False):
        shrink = worse - better
        assert shrink.mean() > 3 * shrink.std() / math.sqrt(len(shrink))
    assert errors[-1].mean() > -3 * errors[-1].std() / math.sqrt(len(x))  # a lower bound


def test_prior_proposal_is_unbiased_but_noisier(mle, trained_encoder):
    model, x = mle
    x = x[:30]
    exact = model.marginal().log_prob(x).detach()
    naive = ppl_vae.diagnostics(model, None, x, 20000, proposal="prior", seed=2)
    # The prior is a poor proposal for most of these points: only where k-hat says the
    # weights have a finite variance is the delta-method standard error meaningful.
    reliable = naive.khat < 0.7
    assert reliable.sum() >= 3
    error = (naive.log_marginal - exact)[reliable].abs()
    assert (error < 4 * naive.log_marginal_se[reliable] + 1e-3).all()
    guided = ppl_vae.diagnostics(model, trained_encoder, x, 20000, seed=2)
    assert (naive.log_marginal_se > guided.log_marginal_se).all()
    assert (naive.ess < guided.ess).all()


def test_same_seed_same_numbers(mle, trained_encoder):
    model, x = mle
    a = ppl_vae.elbo(model, trained_encoder, x[:10], 100, seed=3)
    b = ppl_vae.elbo(model, trained_encoder, x[:10], 100, seed=3)
    assert torch.equal(a, b)


def test_numpy_input_is_accepted(mle, trained_encoder):
    model, x = mle
    out = ppl_vae.log_marginal(model, trained_encoder, x[:5].numpy(), 10)
    assert out.shape == (5,)


def test_summary_reports_means_with_standard_errors(mle, trained_encoder):
    model, x = mle
    s = ppl_vae.diagnostics(model, trained_encoder, x[:50], 200, seed=0).summary()
    assert s["num_data"] == 50 and s["num_samples"] == 200
    assert s["log_marginal_se"] > 0 and s["elbo"] <= s["log_marginal"]


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full((3, 10), np.nan), "x has 30 NaN or inf"),
        (np.array([[0.0] * 9 + [np.inf]]), "x has 1 NaN or inf"),
        (np.zeros(10), r"x must have shape \(N, D\), got 1 dims"),
        (np.zeros((2, 3, 10)), r"x must have shape \(N, D\), got 3 dims"),
        (np.zeros((4, 7)), "x has 7 columns but the model's data_dim is 10"),
        (np.zeros((0, 10)), "x is empty"),
        ([[0.0] * 10], "x must be a torch.Tensor or numpy array, got list"),
    ],
)
def test_bad_data_is_refused(mle, bad, match):
    model, _ = mle
    with pytest.raises(ValueError, match=match):
        ppl_vae.log_marginal(model, ExactPosterior(model), bad, 10)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_num_samples_is_refused(mle, k):
    model, x = mle
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        ppl_vae.elbo(model, ExactPosterior(model), x[:2], k)


def test_bad_proposal_is_refused(mle):
    model, x = mle
    with pytest.raises(ValueError, match="proposal must be one of"):
        ppl_vae.log_marginal(model, None, x[:2], 10, proposal="posterior")


class _PointMassGuide(PyroModule):
    def forward(self, x, idx=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            pyro.sample("z", dist.Delta(x[..., :2]).to_event(1))


def test_point_mass_guide_is_refused_as_proposal(mle):
    model, x = mle
    with pytest.raises(ValueError, match="point mass"):
        ppl_vae.log_marginal(model, _PointMassGuide(), x[:3], 10)


class _GlobalLatentModel(PyroModule):
    data_dim = 10

    def forward(self, x, idx=None, num_data=None):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            loc = shift[..., None] * x.new_ones(10)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def test_global_latent_is_refused():
    x = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="outside the 'data' plate"):
        ppl_vae.log_marginal(_GlobalLatentModel(), None, x, 10, proposal="prior")


def test_vae_log_marginal_matches_a_hand_written_iwae():
    # The chunked, traced estimator against the same quantity written by hand (all K
    # samples at once): the two agree within their Monte Carlo standard errors.
    import torch.nn.functional as F

    from ppl_vae.guides import MLPEncoder
    from ppl_vae.models import VAE

    torch.manual_seed(0)
    model, guide = VAE(20, 3, hidden=(16,)), MLPEncoder(20, 3, hidden=(16,))
    x = (torch.rand(40, 20) < 0.3).float()
    k = 4000
    with torch.no_grad():
        q = guide.distribution(x).base_dist
        z = q.rsample((k,))
        log_lik = -F.binary_cross_entropy_with_logits(
            model.decoder(z), x.expand(k, -1, -1), reduction="none"
        ).sum(-1)
        prior = torch.distributions.Normal(0.0, 1.0)
        lw = log_lik + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    by_hand = ppl_vae.summarize_log_weights(lw)
    ours = ppl_vae.diagnostics(model, guide, x, k, seed=1)
    se = torch.hypot(by_hand.log_marginal_se, ours.log_marginal_se)
    assert ((ours.log_marginal - by_hand.log_marginal).abs() < 4 * se).all()
    se = torch.hypot(by_hand.elbo_se, ours.elbo_se)
    assert ((ours.elbo - by_hand.elbo).abs() < 4 * se).all()


def test_a_seeded_call_leaves_the_callers_random_state_alone(mle, trained_encoder):
    model, x = mle
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ppl_vae.elbo(model, trained_encoder, x[:5], 10, seed=7)
    assert torch.equal(torch.rand(3), expected)


class _NoEventDims(PyroModule):
    data_dim = 10

    def forward(self, x, idx=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(10), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)  # forgot .to_event(1)


def test_missing_event_dims_are_refused_before_any_work():
    # With 10 rows of 10 dims the shapes happen to broadcast, so only a one-row trace
    # shows the mistake.
    with pytest.raises(ValueError, match=r"(?s)fails on a single datapoint.*to_event"):
        ppl_vae.log_marginal(_NoEventDims(), None, torch.zeros(10, 10), 5, proposal="prior")


def _local_z_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 10), 1.0).to_event(1))


def test_global_latent_is_refused_by_gaps_before_fitting():
    with pytest.raises(ValueError, match="outside the 'data' plate"):
        ppl_vae.gaps(_GlobalLatentModel(), _local_z_guide, torch.zeros(3, 10), local="diag")


def test_exact_posterior_weights_are_not_flagged_by_khat(mle):
    # Equal weights (up to rounding) are the most reliable estimate there is; a Pareto fit
    # to their ties returns inf, which used to flag every datapoint above 0.7.
    model, x = mle
    d = ppl_vae.diagnostics(model, ExactPosterior(model), x[:20], num_samples=200)
    assert (d.khat == 0).all()


def test_khat_still_flags_heavy_tails_and_keeps_light_ones():
    gen = torch.Generator().manual_seed(0)
    # Log weights log(U^-1) of a Pareto with shape 1 (infinite variance): k-hat near 1.
    heavy = -torch.rand(4000, 5, generator=gen, dtype=torch.float64).log()
    assert (ppl_vae.pareto_khat(heavy) > 0.7).all()
    # A light tail spread over more than the tie span: arviz's value, unchanged.
    light = 1e-3 * torch.randn(4000, 5, generator=gen, dtype=torch.float64)
    khat = ppl_vae.pareto_khat(light)
    assert (khat < 0.5).all() and (khat != 0).all()
    tied = torch.full((4000, 5), -97.3, dtype=torch.float32)
    assert (ppl_vae.pareto_khat(tied) == 0).all()
