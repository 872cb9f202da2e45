import numpy as np
import pyro
import pytest
import torch
from sklearn.decomposition import PCA

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA


def test_posterior_satisfies_bayes_rule(ppca_truth):
    # log p(x) = log p(x | z) + log p(z) - log p(z | x) for any z: checks marginal and
    # posterior against the model's own densities.
    model, x = ppca_truth
    x = x[:50]
    z = torch.randn(50, 2, dtype=torch.float64)
    trace = pyro.poutine.trace(pyro.poutine.condition(model, data={"z": z})).get_trace(x)
    trace.compute_log_prob()
    joint = trace.nodes["x"]["log_prob"] + trace.nodes["z"]["log_prob"]
    bayes = joint - model.posterior(x).log_prob(z)
    torch.testing.assert_close(bayes, model.marginal().log_prob(x), rtol=0, atol=1e-9)


def test_mle_is_a_stationary_point_of_the_exact_likelihood(ppca_truth):
    _, x = ppca_truth
    mle = PPCA.from_data(x, 2)
    mle.marginal().log_prob(x).mean().backward()
    for name, p in mle.named_parameters():
        assert p.grad.abs().max() < 1e-8, name


def test_mle_agrees_with_sklearn_pca(ppca_truth):
    _, x = ppca_truth
    n = len(x)
    mle = PPCA.from_data(x, 2)
    pca = PCA(n_components=2).fit(x.numpy())
    # scikit-learn divides the sample covariance by N - 1, the MLE by N.
    sk_cov = torch.from_numpy(pca.get_covariance()) * (n - 1) / n
    torch.testing.assert_close(mle.marginal().covariance_matrix, sk_cov, rtol=1e-9, atol=1e-9)
    ours = float(mle.marginal().log_prob(x).mean())
    assert ours >= pca.score(x.numpy())  # the MLE cannot be beaten...
    assert ours - pca.score(x.numpy()) < 1e-3  # ...and N vs N-1 costs almost nothing


def test_svi_reaches_the_closed_form_mle(ppca_truth):
    _, x = ppca_truth
    mle = float(PPCA.from_data(x, 2).marginal().log_prob(x).mean().detach())
    model = PPCA(10, 2).double()
    guide = LinearEncoder(10, 2).double()
    ppl_vae.fit(model, guide, x, num_steps=800, lr=3e-2, seed=0, progress=False)
    ppl_vae.fit(model, guide, x, num_steps=300, lr=3e-3, seed=1, progress=False)
    reached = float(model.marginal().log_prob(x).mean().detach())
    assert mle - 0.02 < reached <= mle + 1e-9


def test_two_models_share_no_parameters(ppca_truth):
    _, x = ppca_truth
    first, second = PPCA(10, 2).double(), PPCA(10, 2).double()
    before = {k: v.detach().clone() for k, v in second.state_dict().items()}
    ppl_vae.fit(first, LinearEncoder(10, 2).double(), x, num_steps=20, lr=0.1, progress=False)
    for k, v in second.state_dict().items():
        assert torch.equal(v, before[k]), k
    ids = {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
    assert not ids
    assert len(pyro.get_param_store()) == 0


@pytest.mark.parametrize("latent_dim", [0, 10])
def test_from_data_refuses_bad_latent_dim(latent_dim):
    with pytest.raises(ValueError, match="latent_dim"):
        PPCA.from_data(np.zeros((5, 10)), latent_dim)


@pytest.mark.parametrize("rows, dims, latent_dim, dtype", [
    (3, 6, 2, torch.float64),   # 3 rows span 2 directions: sigma came out NaN
    (4, 6, 3, torch.float64),   # 3 directions: sigma 8.9e-9, log p(x) about -7e15
    (4, 6, 3, torch.float32),
])
def test_from_data_refuses_data_that_span_no_more_than_the_latent_dims(rows, dims,
                                                                          latent_dim, dtype):
    x = torch.randn(rows, dims, generator=torch.Generator().manual_seed(0), dtype=dtype)
    with pytest.raises(ValueError, match="span at most latent_dim"):
        PPCA.from_data(x, latent_dim)


def test_from_data_refuses_a_constant_column_left_as_the_only_noise():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 3] = 2.0  # sigma came out 0 exactly with latent_dim = D - 1
    with pytest.raises(ValueError, match="span at most latent_dim"):
        PPCA.from_data(x, 3)
    assert float(PPCA.from_data(x, 2).sigma) > 0  # one noisy direction left: fine


def test_score_is_the_exact_log_px_without_a_graph_and_marginal_stays_trainable():
    # Issue 9, section 5: float() on marginal().log_prob(x) warned (it requires grad, by
    # design: notebook 01 trains on it); score()/score_samples() evaluate without a graph.
    import warnings

    model = PPCA(5, 2).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = model.score(x)
        per_point = model.score_samples(x)
    assert not per_point.requires_grad and per_point.shape == (30,)
    assert value == float(model.marginal().log_prob(x).detach().mean())
    loss = -model.marginal().log_prob(x).mean()
    loss.backward()
    assert model.W.grad is not None and model.W.grad.abs().sum() > 0
