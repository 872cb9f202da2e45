import pyro
import torch
from sklearn.decomposition import FactorAnalysis as SkFactorAnalysis

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import FactorAnalysis


def test_posterior_satisfies_bayes_rule(fa_truth):
    model, x = fa_truth
    x = x[:50]
    z = torch.randn(50, 2, dtype=torch.float64)
    trace = pyro.poutine.trace(pyro.poutine.condition(model, data={"z": z})).get_trace(x)
    trace.compute_log_prob()
    joint = trace.nodes["x"]["log_prob"] + trace.nodes["z"]["log_prob"]
    bayes = joint - model.posterior(x).log_prob(z)
    torch.testing.assert_close(bayes, model.marginal().log_prob(x), rtol=0, atol=1e-9)


def test_marginal_covariance_matches_samples(fa_truth):
    model, x = fa_truth
    cov = torch.cov(x.T, correction=0)
    expected = model.marginal().covariance_matrix.detach()
    # Each entry of a sample covariance has sd sqrt((S_ii S_jj + S_ij^2) / N).
    var = torch.outer(expected.diagonal(), expected.diagonal()) + expected.square()
    assert ((cov - expected).abs() / (var / len(x)).sqrt()).max() < 5


def test_svi_reaches_sklearn_factor_analysis(fa_truth):
    _, x = fa_truth
    reference = SkFactorAnalysis(2, tol=1e-8, max_iter=5000).fit(x.numpy()).score(x.numpy())
    model = FactorAnalysis(8, 2).double()
    guide = LinearEncoder(8, 2, covariance="full").double()
    ppl_vae.fit(model, guide, x, num_steps=800, lr=3e-2, seed=0, progress=False)
    ppl_vae.fit(model, guide, x, num_steps=300, lr=3e-3, seed=1, progress=False)
    reached = float(model.marginal().log_prob(x).mean().detach())
    assert abs(reached - reference) < 0.05
