"""The deep latent Gaussian model of a variational autoencoder (Kingma & Welling, 2014).

    z ~ N(0, I_k),    x | z ~ Bernoulli(sigmoid(f(z)))    or    N(f(z), diag(sigma^2))

with f an MLP decoder. Unlike PPCA, neither p(x) nor p(z | x) has a closed form: the
estimators reach them by importance sampling, with an encoder as the proposal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn

from ppl_vae.models.blocks import MLP, data_plate, network, positive_dim
from ppl_vae.models.distributions import Bernoulli, Normal, StandardNormal

LIKELIHOODS = ("bernoulli", "gaussian")

# Lower bound of a learned Gaussian scale. A pixel that is constant in the data (the
# border of the digits) would otherwise drive its scale to zero and the likelihood to
# +inf; with the floor its log density stays below -log(1e-3) ~ 7 nats.
SIGMA_FLOOR = 1e-3


class VAE(PyroModule):
    """The generative model of a VAE: a standard normal prior and an MLP decoder.

    Parameters
    ----------
    data_dim, latent_dim : int
        D, the dimension of x, and k, that of z.
    hidden, activation : sequence of int, str
        The decoder's hidden widths from z towards x, and its nonlinearity
        (``ppl_vae.models.blocks.ACTIVATIONS``).
    likelihood : {"bernoulli", "gaussian"}
        x | z ~ Bernoulli(logits=f(z)), for binary data, or N(f(z), diag(sigma^2)).
    sigma : float, optional
        Gaussian only: a fixed scale, or None to learn one per dimension (:doc:`models`).

    Attributes
    ----------
    decoder : MLP
        f, mapping z of shape (..., k) to the likelihood's parameters, shape (..., D).

    Examples
    --------
    >>> import torch
    >>> from ppl_vae.models import VAE
    >>> model = VAE(64, 2, hidden=(16,))
    >>> model.decode(torch.zeros(3, 2)).shape  # pixel probabilities of p(x | z)
    torch.Size([3, 64])
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        *,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        sigma: float | None = None,
    ):
        super().__init__()
        positive_dim(data_dim, "data_dim")
        positive_dim(latent_dim, "latent_dim")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        _check_sigma(sigma, likelihood)
        self.data_dim, self.latent_dim, self.likelihood = int(data_dim), int(latent_dim), likelihood
        self.decoder = MLP(latent_dim, data_dim, hidden=hidden, activation=activation)
        # Buffers, so the prior is not rebuilt at every call and follows .to()/.double().
        self.register_buffer("prior_loc", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.ones(latent_dim))
        self.learned_sigma = likelihood == "gaussian" and sigma is None
        if self.learned_sigma:
            # softplus(raw) + floor = 1 at the start.
            start = math.log(math.expm1(1.0 - SIGMA_FLOOR))
            self.raw_sigma = nn.Parameter(torch.full((data_dim,), start))
        elif likelihood == "gaussian":
            self.register_buffer("fixed_sigma", torch.full((data_dim,), float(sigma)))

    def forward(
        self, x: Tensor | None = None, idx: Tensor | None = None, num_data: int | None = None
    ) -> Tensor:
        with data_plate(x, idx, num_data):
            prior = StandardNormal(self.prior_loc, self.prior_scale)  # buffers of 0s, 1s
            z = pyro.sample("z", prior.to_event(1))
            return pyro.sample("x", self._likelihood(network(self, "decoder")(z)), obs=x)

    def _likelihood(self, out: Tensor) -> dist.TorchDistribution:
        """p(x | z) from the decoder's output f(z) of shape (..., D)."""
        if self.likelihood == "bernoulli":
            return Bernoulli(logits=out).to_event(1)
        return Normal(out, self.noise_scale()).to_event(1)

    def noise_scale(self) -> Tensor:
        """The Gaussian likelihood's scale sigma per data dimension, shape (D,)."""
        if self.likelihood != "gaussian":
            raise ValueError("noise_scale() needs likelihood='gaussian'; this VAE is Bernoulli")
        if self.learned_sigma:
            return F.softplus(self.raw_sigma) + SIGMA_FLOOR
        return self.fixed_sigma

    def decode(self, z: Tensor) -> Tensor:
        """The mean of p(x | z): pixel probabilities (Bernoulli) or f(z) (Gaussian).

        Parameters
        ----------
        z : Tensor of shape (..., k)

        Returns
        -------
        Tensor of shape (..., D)
        """
        return self._likelihood(network(self, "decoder")(z)).mean

    def validate_data(self, x: Tensor) -> None:
        """Refuse data the likelihood cannot score: non-binary x for a Bernoulli.

        Called by the engine's input checks before any work.
        """
        if self.likelihood != "bernoulli":
            return
        bad = (x != 0) & (x != 1)
        if bad.any():
            example = float(x[bad][0])
            raise ValueError(
                f"x has {int(bad.sum())} values outside {{0, 1}} (e.g. {example:.4g}), but "
                "likelihood='bernoulli' needs binary data: binarize it, e.g. "
                "load_dataset(..., binarize='static') or fit(..., binarize='dynamic')"
            )


def _check_sigma(sigma, likelihood: str) -> None:
    if sigma is None:
        return
    if likelihood != "gaussian":
        raise ValueError(f"sigma applies to likelihood='gaussian' only, got sigma={sigma!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError(f"sigma must be a positive float or None, got {sigma!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite float or None, got {sigma!r}")
