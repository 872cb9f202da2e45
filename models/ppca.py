"""Probabilistic PCA (Tipping & Bishop, 1999): isotropic noise sigma^2 I."""

from __future__ import annotations

import numpy as np
import torch
from pyro.nn import PyroParam
from torch import Tensor
from torch.distributions import constraints

from ppl_vae.models.linear_gaussian import LinearGaussian


class PPCA(LinearGaussian):
    """z ~ N(0, I_k), x | z ~ N(W z + mu, sigma^2 I_d).

    Parameters
    ----------
    data_dim : int
        D, the dimension of x.
    latent_dim : int
        k, the dimension of z.
    sigma : float
        Initial noise standard deviation (learnable, kept positive).

    Examples
    --------
    >>> import torch
    >>> from ppl_vae.models import PPCA
    >>> x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    >>> model = PPCA.from_data(x, latent_dim=2)  # the closed-form maximum likelihood
    >>> model.marginal().event_shape, model.posterior(x).batch_shape
    (torch.Size([5]), torch.Size([100]))
    >>> model.score(x) > PPCA(5, 2).score(x)
    True
    """

    def __init__(self, data_dim: int, latent_dim: int, *, sigma: float = 1.0):
        super().__init__(data_dim, latent_dim)
        self.sigma = PyroParam(torch.tensor(float(sigma)), constraint=constraints.positive)

    def noise_variance(self) -> Tensor:
        return self.sigma.square().expand(self.data_dim)

    @classmethod
    def from_data(cls, x: Tensor | np.ndarray, latent_dim: int) -> PPCA:
        """The closed-form maximum-likelihood PPCA of ``x`` (Tipping & Bishop, 1999).

        With S the sample covariance (divided by N) and eigenpairs (lambda_i, u_i) in
        decreasing order: mu is the sample mean, sigma^2 the mean of the discarded
        eigenvalues, and W = U_k (Lambda_k - sigma^2 I)^(1/2).

        Parameters
        ----------
        x : Tensor or ndarray of shape (N, D)
        latent_dim : int, smaller than D and than the rank of the centred data

        Raises
        ------
        ValueError
            For bad shapes, or data spanning no more than ``latent_dim`` directions
            (N <= latent_dim + 1 rows, constant columns), where no MLE exists.

        Returns
        -------
        PPCA in the dtype and on the device of ``x`` (float64 for numpy input).
        """
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.double()
        if x.ndim != 2 or not 0 < latent_dim < x.shape[1]:
            raise ValueError(
                f"from_data needs x of shape (N, D) and 0 < latent_dim < D, "
                f"got x.shape={tuple(x.shape)} and latent_dim={latent_dim}"
            )
        n, d = x.shape
        # In float64 whatever the data's dtype: the discarded eigenvalues are compared
        # with their rounding level below, which float32 would raise to 1e-4 on MNIST.
        wide = x.double()
        mean = wide.mean(0)
        centred = wide - mean
        eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / n)
        eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
        sigma2 = eigvals[latent_dim:].mean()
        # Rounding leaves eigenvalues of order eps * lambda_max * D where the true ones
        # are 0: below that, the data span at most latent_dim directions, sigma -> 0
        # raises the likelihood without end, and there is no MLE to return.
        rounding = torch.finfo(torch.float64).eps * float(eigvals[0].abs()) * d
        if not float(sigma2) > rounding:
            raise ValueError(
                f"the centred data span at most latent_dim={latent_dim} directions (the "
                f"discarded eigenvalues' mean is {float(sigma2):.3g}, at rounding level): "
                "PPCA's likelihood then grows without end as sigma -> 0 and has no maximum; "
                "use fewer latent dims, or more rows than latent_dim + 1"
            )
        W = eigvecs[:, :latent_dim] * (eigvals[:latent_dim] - sigma2).clamp_min(0).sqrt()
        model = cls(d, latent_dim).to(x)  # x's dtype and device
        with torch.no_grad():
            model.W.copy_(W)
            model.mu.copy_(mean)
        model.sigma = PyroParam(sigma2.sqrt().to(x.dtype), constraint=constraints.positive)
        return model
