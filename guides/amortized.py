"""Amortized guides: encoders q(z | x) that map every datapoint to its posterior."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn

from ppl_vae.models.blocks import MLP, data_plate, network, positive_dim

COVARIANCES = ("diag", "full")


class LinearEncoder(PyroModule):
    """q(z | x) = N(A x + b, S): the recognition model of factor analysis and PPCA.

    Parameters
    ----------
    data_dim : int
        D, the dimension of x.
    latent_dim : int
        k, the dimension of z.
    covariance : {"diag", "full"}
        ``"diag"``: S diagonal with a learned scale per latent dimension (mean field);
        ``"full"``: a learned Cholesky factor of S shared by all datapoints.
    """

    def __init__(self, data_dim: int, latent_dim: int, *, covariance: str = "diag"):
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.covariance = covariance
        self.loc = nn.Linear(data_dim, latent_dim)
        # Zero weights start every datapoint at the prior, a safe place for SVI to leave.
        nn.init.zeros_(self.loc.weight)
        nn.init.zeros_(self.loc.bias)
        # diag: log-scales; full: the lower triangle, its diagonal through softplus.
        raw_scale = torch.zeros(latent_dim) if covariance == "diag" else torch.eye(latent_dim)
        self.raw_scale = nn.Parameter(raw_scale)

    def scale_tril(self) -> Tensor:
        """The shared Cholesky factor of S, shape (k, k)."""
        if self.covariance == "diag":
            return torch.diag(self.raw_scale.exp())
        raw = self.raw_scale
        diagonal = F.softplus(raw.diagonal()) / F.softplus(raw.new_ones(()))
        return raw.tril(-1) + torch.diag(diagonal)

    def distribution(self, x: Tensor) -> dist.TorchDistribution:
        """q(z | x) for a batch.

        Parameters
        ----------
        x : Tensor of shape (..., N, D)

        Returns
        -------
        Independent Normal (``"diag"``) or MultivariateNormal (``"full"``) with batch
        shape (..., N) and event shape (k,).
        """
        loc = network(self, "loc")(x)
        if self.covariance == "diag":
            return dist.Normal(loc, self.raw_scale.exp()).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril())

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        q = self.distribution(x)
        with data_plate(x, idx, num_data):
            return pyro.sample("z", q)


# Floor under the encoder's scales. softplus(raw) underflows to 0 for very negative raw,
# and a zero scale makes log q(z | x) infinite (a NaN gradient, an infinite importance
# weight). 1e-4 is far below any posterior width that matters, so it changes no fit.
SCALE_FLOOR = 1e-4


class MLPEncoder(PyroModule):
    """q(z | x) = N(mu(x), diag(sigma(x)^2)): the Gaussian MLP encoder of a VAE.

    One MLP maps x to 2k numbers, cut into the loc mu(x) and a raw scale;
    sigma(x) = softplus(raw) + ``SCALE_FLOOR``. Amortized: ``idx`` is ignored.

    Parameters
    ----------
    data_dim : int
        D, the dimension of x.
    latent_dim : int
        k, the dimension of z.
    hidden : sequence of int
        Widths of the hidden layers, from x towards z.
    activation : str
        Nonlinearity, one of ``ppl_vae.models.blocks.ACTIVATIONS``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        *,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
    ):
        super().__init__()
        self.data_dim = positive_dim(data_dim, "data_dim")
        self.latent_dim = positive_dim(latent_dim, "latent_dim")
        self.net = MLP(data_dim, latent_dim, latent_dim, hidden=hidden, activation=activation)

    def distribution(self, x: Tensor) -> dist.Independent:
        """q(z | x) for a batch.

        Parameters
        ----------
        x : Tensor of shape (..., N, D)

        Returns
        -------
        Independent Normal with batch shape (..., N) and event shape (k,).
        """
        loc, raw_scale = network(self, "net")(x)
        return dist.Normal(loc, F.softplus(raw_scale) + SCALE_FLOOR).to_event(1)

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        q = self.distribution(x)
        with data_plate(x, idx, num_data):
            return pyro.sample("z", q)


class DeltaEncoder(PyroModule):
    """q(z | x) = delta(z - g(x)): a deterministic encoder, the autoencoder baseline.

    With a point mass as the guide the single-sample ELBO has no entropy term and no
    noise, and Trace_ELBO's loss for one datapoint becomes

        -log p(x | g(x)) - log p(g(x))
            = reconstruction loss + ||g(x)||^2 / 2 + (k/2) log(2 pi),

    the loss of a deterministic autoencoder (cross-entropy for a Bernoulli decoder,
    squared error over 2 sigma^2 for a Gaussian one) plus an L2 penalty on the codes
    that the N(0, I) prior contributes. It is MAP estimation of z per datapoint, and
    not a bound on log p(x): a point mass has no density, so the estimators refuse it
    as an importance proposal (use ``proposal="prior"`` or an encoder with a density).

    Parameters
    ----------
    data_dim : int
        D, the dimension of x.
    latent_dim : int
        k, the dimension of z.
    hidden : sequence of int
        Widths of the hidden layers of g, from x towards z.
    activation : str
        Nonlinearity, one of ``ppl_vae.models.blocks.ACTIVATIONS``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        *,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
    ):
        super().__init__()
        self.data_dim = positive_dim(data_dim, "data_dim")
        self.latent_dim = positive_dim(latent_dim, "latent_dim")
        self.net = MLP(data_dim, latent_dim, hidden=hidden, activation=activation)

    def distribution(self, x: Tensor) -> dist.Independent:
        """The point mass at g(x): an Independent Delta, batch shape (..., N), event (k,)."""
        return dist.Delta(network(self, "net")(x)).to_event(1)

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        q = self.distribution(x)
        with data_plate(x, idx, num_data):
            return pyro.sample("z", q)
