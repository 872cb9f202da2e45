"""Shared fixtures: small data drawn from known linear-Gaussian models, in float64."""

import math

import pyro
import pytest
import torch

from ppl_vae.models import PPCA, FactorAnalysis


def draw(model, num_data: int, seed: int) -> torch.Tensor:
    pyro.set_rng_seed(seed)
    # A plain call of a PyroModule registers its parameters in Pyro's global store, and
    # takes a PyroParam of the same name (PPCA's "sigma") from there if one is left over
    # from another model: start and end with an empty store.
    pyro.clear_param_store()
    with torch.no_grad():
        data = model(None, num_data=num_data)
    pyro.clear_param_store()
    return data


@pytest.fixture(autouse=True)
def empty_param_store():
    """Each test starts and ends with Pyro's global param store empty."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="module")
def ppca_truth():
    """A PPCA with d=10, k=2 and data drawn from it (float64)."""
    pyro.set_rng_seed(0)
    model = PPCA(10, 2, sigma=0.5).double()
    with torch.no_grad():
        model.W.mul_(20.0)  # loadings well above the noise, so the subspace is clear
        model.mu.normal_()
    return model, draw(model, 2000, seed=1)


@pytest.fixture(scope="module")
def fa_truth():
    """A factor analysis model with d=8, k=2, unequal noise, and data drawn from it."""
    pyro.set_rng_seed(0)
    model = FactorAnalysis(8, 2).double()
    with torch.no_grad():
        model.W.mul_(15.0)
        model.mu.normal_()
        model.psi = torch.linspace(0.1, 1.0, 8, dtype=torch.float64)
    return model, draw(model, 2000, seed=1)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The test models are tiny: a second intra-op thread only adds synchronisation, and
    # on a loaded 2-core machine it makes each small op many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rotation(angle: float) -> torch.Tensor:
    """A 2-D rotation matrix (float64)."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


@pytest.fixture(scope="module")
def rotated():
    """A fitted PPCA with its latent space rotated by 45 degrees, and its data.

    The MLE's loadings have orthogonal columns of unequal length, so its posterior
    covariance is diagonal; W -> W R leaves p(x) unchanged but correlates the posterior,
    so the mean-field approximation gap is large.
    """
    pyro.set_rng_seed(3)
    truth = PPCA(10, 2, sigma=0.5).double()
    with torch.no_grad():
        truth.W.copy_(torch.randn(10, 2, dtype=torch.float64) * torch.tensor([1.5, 0.4]))
        truth.mu.normal_()
        x = truth(None, num_data=300)
    model = PPCA.from_data(x, 2)
    with torch.no_grad():
        model.W.copy_(model.W @ rotation(math.pi / 4))
    return model, x
