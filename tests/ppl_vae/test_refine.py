"""refine()'s default schedule closes the amortization gap (issue 9, section 5)."""

import pytest
import torch

import ppl_vae
from ppl_vae.guides import LinearEncoder


def best_mean_field_elbo(model, x) -> float:
    # For a Gaussian posterior with precision L, the best diagonal Gaussian has the
    # posterior's mean and variances 1/L_ii, and falls short of log p(x) by
    # KL = (sum_i log L_ii - log det L) / 2.
    precision = torch.linalg.inv(model.posterior(x[:1]).covariance_matrix[0])
    shortfall = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    return model.score(x) - shortfall.item()


@pytest.fixture(scope="module")
def problem(ppca_truth):
    model, x = ppca_truth
    torch.manual_seed(0)
    encoder = LinearEncoder(10, 2).double()  # untrained: a large amortization gap
    return model, encoder, x[:200]


def closed(problem, steps, **kwargs) -> float:
    model, encoder, x = problem
    target = best_mean_field_elbo(model, x)
    curve = ppl_vae.refine(model, encoder, x, steps, num_samples=200, target_elbo=target,
                           seed=0, progress=False, **kwargs)
    return float(curve.gap_closed[-1]), curve


def test_the_default_schedule_reaches_the_best_member_of_the_family(problem):
    fraction, curve = closed(problem, 600)
    se = float(curve.elbo_se[-1]) / abs(curve.target_elbo - curve.elbo[0])
    assert fraction == pytest.approx(1.0, abs=max(3 * se, 2e-3))
