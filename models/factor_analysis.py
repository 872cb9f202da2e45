"""Factor analysis: a linear-Gaussian model with a separate noise variance per dimension."""

from __future__ import annotations

import torch
from pyro.nn import PyroParam
from torch import Tensor
from torch.distributions import constraints

from ppl_vae.models.linear_gaussian import LinearGaussian


class FactorAnalysis(LinearGaussian):
    """z ~ N(0, I_k), x | z ~ N(C z + d, diag(psi)), psi > 0 per dimension.

    The loading matrix C is ``self.W`` and the offset d is ``self.mu`` (shared names with
    PPCA, so closed forms and tests treat both alike).

    Parameters
    ----------
    data_dim : int
        D, the dimension of x.
    latent_dim : int
        k, the number of factors.
    psi : float
        Initial noise variance of every dimension (learnable, kept positive).
    """

    def __init__(self, data_dim: int, latent_dim: int, *, psi: float = 1.0):
        super().__init__(data_dim, latent_dim)
        self.psi = PyroParam(torch.full((data_dim,), float(psi)), constraint=constraints.positive)

    def noise_variance(self) -> Tensor:
        return self.psi
