"""Shared fixtures: small data drawn from known linear-Gaussian models, in float64."""

import pyro
import pytest
import torch

from models import PPCA, FactorAnalysis


def draw(model, num_data: int, seed: int) -> torch.Tensor:
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return model(None, num_data=num_data)


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
