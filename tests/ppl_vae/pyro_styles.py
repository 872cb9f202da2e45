"""Models and guides written as Pyro users write them, for the tests of the boundary.

None of them follows the library's convention: functions and bound methods taking the
data alone, parameters in Pyro's global param store (``pyro.param`` with constraints,
``pyro.module``), plates named other than ``"data"`` and sized by ``x.shape[0]``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints


class TutorialVAE(nn.Module):
    """The VAE of Pyro's tutorial: nn.Module networks, ``pyro.module``, bound methods."""

    def __init__(self, data_dim: int = 64, z_dim: int = 4, hidden: int = 50):
        super().__init__()
        self.z_dim, self.data_dim = z_dim, data_dim
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.Softplus(),
                                     nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(),
                                     nn.Linear(hidden, data_dim), nn.Sigmoid())

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            probs = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(probs, validate_args=False).to_event(1),
                        obs=x.reshape(-1, self.data_dim))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encode(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    def encode(self, x):
        loc, log_scale = self.encoder(x).chunk(2, -1)
        return loc, log_scale.exp()


# A linear-Gaussian model with two latent sites of different event shapes, its
# parameters in the global param store (sigma constrained positive), plate "N".
D = 4


def linear_model(x):
    W = pyro.param("W", lambda: torch.randn(D, 2))
    w = pyro.param("w", lambda: torch.randn(D))
    b = pyro.param("b", lambda: torch.zeros(D))
    sigma = pyro.param("sigma", lambda: torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("N", x.shape[0]):
        a = pyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        e = pyro.sample("e", dist.Normal(0.0, 1.0))
        loc = a @ W.T + e[..., None] * w + b
        pyro.sample("obs", dist.Normal(loc, sigma).to_event(1), obs=x)


def linear_guide(x):
    A = pyro.param("A", lambda: torch.zeros(D, 2))
    c = pyro.param("c", lambda: torch.zeros(D))
    offset_a = pyro.param("offset_a", lambda: torch.zeros(2))
    offset_e = pyro.param("offset_e", lambda: torch.tensor(0.0))
    scale_a = pyro.param("scale_a", lambda: torch.ones(2), constraint=constraints.positive)
    scale_e = pyro.param("scale_e", lambda: torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("N", x.shape[0]):
        pyro.sample("a", dist.Normal(x @ A + offset_a, scale_a).to_event(1))
        pyro.sample("e", dist.Normal(x @ c + offset_e, scale_e))


def linear_marginal() -> torch.distributions.MultivariateNormal:
    """p(x) of ``linear_model`` at the param store's current values, in closed form."""
    W, w, b = (pyro.param(n).detach() for n in ("W", "w", "b"))
    sigma = pyro.param("sigma").detach()
    M = torch.cat([W, w[:, None]], 1)
    return torch.distributions.MultivariateNormal(b, M @ M.T + sigma**2 * torch.eye(D))


def linear_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, 3, generator=g) * 1.5
    return torch.randn(n, 3, generator=g) @ W.T + 0.5 * torch.randn(n, D, generator=g) + 1.0


def mle_log_likelihood(x: torch.Tensor, k: int = 3) -> float:
    """Mean log-likelihood of PPCA with k latents at Tipping & Bishop's closed-form MLE."""
    n, d = x.shape
    centred = x - x.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / n).flip(0).double()
    sigma2 = eigenvalues[k:].mean()
    logdet = eigenvalues[:k].log().sum() + (d - k) * sigma2.log()
    return float(-0.5 * (d * math.log(2 * math.pi) + logdet + d))


class BananaModule(PyroModule):
    """A ``forward(x)`` module (the data alone) with a curved 2-d posterior."""

    def __init__(self, curvature: float = 1.5, noise: float = 0.4):
        super().__init__()
        self.curvature = PyroParam(torch.tensor(curvature))
        self.log_noise = nn.Parameter(torch.tensor(math.log(noise)))

    def forward(self, x):
        with pyro.plate("rows", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            loc = torch.stack([z[..., 0], z[..., 1] + self.curvature * z[..., 0] ** 2], -1)
            pyro.sample("x", dist.Normal(loc, self.log_noise.exp()).to_event(1), obs=x)

    def log_marginal_by_quadrature(self, x: torch.Tensor, points: int = 401) -> torch.Tensor:
        """log p(x_n) by a Riemann sum on a fine grid over z (the integrand vanishes at its
        edges, where the rule is then exact to float64 rounding), in float64."""
        grid = torch.linspace(-6, 6, points, dtype=torch.float64)
        z0, z1 = torch.meshgrid(grid, grid, indexing="ij")
        a = float(self.curvature.detach())
        noise = float(self.log_noise.detach().exp())
        loc = torch.stack([z0, z1 + a * z0**2], -1).reshape(-1, 2)
        log_prior = (torch.distributions.Normal(0.0, 1.0).log_prob(z0)
                     + torch.distributions.Normal(0.0, 1.0).log_prob(z1)).reshape(-1)
        lik = torch.distributions.Normal(loc[:, None, :], noise).log_prob(x.double()[None])
        log_f = log_prior[:, None] + lik.sum(-1)
        cell = float((grid[1] - grid[0]) ** 2)
        return torch.logsumexp(log_f, 0) + math.log(cell)
