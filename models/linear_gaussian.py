"""The linear-Gaussian latent variable model shared by PPCA and factor analysis.

    z ~ N(0, I_k),    x | z ~ N(W z + mu, diag(noise_variance))

Everything about it has a closed form: the marginal p(x) = N(mu, W W^T + Psi) and the
posterior p(z | x) = N(M^-1 W^T Psi^-1 (x - mu), M^-1) with M = I + W^T Psi^-1 W.
Subclasses only say how the noise variance is parameterized.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from ppl_vae.models.affine_normal import AffineNormal
from ppl_vae.models.blocks import data_plate, positive_dim
from ppl_vae.models.distributions import standard_normal


class LinearGaussian(PyroModule):
    """Base class: loading matrix ``W`` [D, k], mean ``mu`` [D], and a noise variance [D]."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.data_dim = positive_dim(data_dim, "data_dim")
        self.latent_dim = positive_dim(latent_dim, "latent_dim")
        # Small random loadings break the rotational symmetry at the start of SVI.
        self.W = nn.Parameter(0.1 * torch.randn(data_dim, latent_dim))
        self.mu = nn.Parameter(torch.zeros(data_dim))

    def noise_variance(self) -> Tensor:
        """Diagonal of the observation noise covariance, shape (D,)."""
        raise NotImplementedError

    def forward(self, x: Tensor | None = None, idx: Tensor | None = None, num_data=None):
        W, mu = self.W, self.mu
        noise_scale = self.noise_variance().sqrt()
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", standard_normal(W, self.latent_dim).to_event(1))
            # The mean W z + mu is formed only where something reads it: an estimator's
            # log density scales the residual without it (see AffineNormal).
            likelihood = AffineNormal(z, W, mu, noise_scale).to_event(1)
            return pyro.sample("x", likelihood, obs=x)

    def marginal(self) -> dist.MultivariateNormal:
        """The exact marginal p(x) = N(mu, W W^T + diag(noise_variance)).

        Differentiable in the parameters on purpose: ``-marginal().log_prob(x).mean()``
        is a loss that trains the model by exact maximum likelihood. Its values
        therefore require grad (and ``float()`` on them warns); to evaluate, use
        :meth:`score_samples` / :meth:`score`, which do not build a graph.
        """
        cov = self.W @ self.W.T + torch.diag(self.noise_variance())
        return dist.MultivariateNormal(self.mu, covariance_matrix=cov)

    def score_samples(self, x: Tensor) -> Tensor:
        """Exact log p(x) per datapoint, for evaluation (no autograd graph).

        Parameters
        ----------
        x : Tensor of shape (N, D)

        Returns
        -------
        Tensor of shape (N,)
        """
        with torch.no_grad():
            return self.marginal().log_prob(x)

    def score(self, x: Tensor) -> float:
        """Mean exact log p(x) over the rows of ``x``, in nats per datapoint."""
        return float(self.score_samples(x).mean())

    def posterior(self, x: Tensor) -> dist.MultivariateNormal:
        """The exact posterior p(z | x) for a batch.

        Parameters
        ----------
        x : Tensor of shape (N, D)

        Returns
        -------
        MultivariateNormal with batch shape (N,) and event shape (k,).
        """
        W, psi = self.W, self.noise_variance()
        W_over_psi = W / psi.unsqueeze(-1)  # Psi^-1 W, [D, k]
        precision = torch.eye(self.latent_dim, dtype=W.dtype, device=W.device)
        precision = precision + W.T @ W_over_psi
        covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        mean = (x - self.mu) @ W_over_psi @ covariance
        scale_tril = torch.linalg.cholesky(covariance)
        return dist.MultivariateNormal(mean, scale_tril=scale_tril.expand(len(x), -1, -1))
