"""Small helpers shared by test modules (fixtures live in conftest.py)."""

import torch
from torch.distributions import MultivariateNormal


def exact_posterior(model, x) -> MultivariateNormal:
    """A linear-Gaussian model's p(z | x) as a plain, detached torch distribution."""
    with torch.no_grad():
        post = model.posterior(x)
    return MultivariateNormal(post.loc, scale_tril=post.scale_tril)


def as_mvn(q) -> MultivariateNormal:
    """A diagonal or full Gaussian guide distribution as a detached MultivariateNormal."""
    if isinstance(q, MultivariateNormal):
        return MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach())
    return MultivariateNormal(q.mean.detach(), scale_tril=torch.diag_embed(q.stddev.detach()))
