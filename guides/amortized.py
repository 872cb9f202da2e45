"""Amortized guides: encoders q(z | x) that map every datapoint to its posterior."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import ConditionalAffineCoupling, Permute
from pyro.nn import ConditionalDenseNN, PyroModule
from torch import Tensor, nn
from torch.distributions.utils import vec_to_tril_matrix

from ppl_vae.models.blocks import ACTIVATIONS, MLP, data_plate, network, positive_dim
from ppl_vae.models.distributions import Normal

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

    Attributes
    ----------
    family : str
        ``covariance``: the variational family, which ``gaps`` matches a local guide to.

    Examples
    --------
    >>> import torch
    >>> from ppl_vae.guides import LinearEncoder
    >>> q = LinearEncoder(64, 2, covariance="full").distribution(torch.rand(10, 64))
    >>> q.batch_shape, q.event_shape
    (torch.Size([10]), torch.Size([2]))
    """

    def __init__(self, data_dim: int, latent_dim: int, *, covariance: str = "diag"):
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.covariance = covariance
        self.family = covariance
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
            return Normal(loc, self.raw_scale.exp()).to_event(1)
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
    """q(z | x) = N(mu(x), L(x) L(x)^T): the Gaussian MLP encoder of a VAE.

    One MLP maps x to mu(x) and a raw Cholesky factor L(x), diagonal or lower triangular
    (see :doc:`guides`). Amortized: ``idx`` is ignored.

    Parameters
    ----------
    data_dim, latent_dim : int
        D, the dimension of x, and k, that of z.
    hidden, activation : sequence of int, str
        The hidden widths from x towards z, and the nonlinearity (``ACTIVATIONS``).
    covariance : {"diag", "full"}
        The shape of L(x): mean-field, or correlated latents.

    Attributes
    ----------
    family : str
        ``covariance``: the variational family, which ``gaps`` matches a local guide to.

    Examples
    --------
    >>> import torch
    >>> from ppl_vae.guides import MLPEncoder
    >>> q = MLPEncoder(64, 2, hidden=(16,)).distribution(torch.rand(10, 64))
    >>> q.batch_shape, q.event_shape
    (torch.Size([10]), torch.Size([2]))
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        *,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        covariance: str = "diag",
    ):
        super().__init__()
        self.data_dim = positive_dim(data_dim, "data_dim")
        self.latent_dim = positive_dim(latent_dim, "latent_dim")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.covariance = self.family = covariance
        # Heads: loc, raw diagonal, and (full, k > 1) the strictly lower triangle.
        heads = (latent_dim, latent_dim)
        if covariance == "full" and latent_dim > 1:
            heads += (latent_dim * (latent_dim - 1) // 2,)
        self.net = MLP(data_dim, *heads, hidden=hidden, activation=activation)
        if len(heads) == 3:
            # Start with L(x) diagonal: the full encoder sets off from where a diagonal
            # one would, and learns correlations only where the ELBO asks for them.
            last = self.net.layers[-1]
            with torch.no_grad():
                last.weight[2 * latent_dim:].zero_()
                last.bias[2 * latent_dim:].zero_()

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
        loc, raw_scale, *lower = network(self, "net")(x)
        scale = F.softplus(raw_scale) + SCALE_FLOOR
        if self.covariance == "diag":
            return Normal(loc, scale).to_event(1)
        scale_tril = torch.diag_embed(scale)
        if lower:
            scale_tril = scale_tril + vec_to_tril_matrix(lower[0], diag=-1)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        q = self.distribution(x)
        with data_plate(x, idx, num_data):
            return pyro.sample("z", q)


class DeltaEncoder(PyroModule):
    """q(z | x) = delta(z - g(x)): a deterministic encoder, the autoencoder baseline.

    Trace_ELBO's loss is then an autoencoder's plus an L2 penalty on the codes (MAP z,
    not a bound on log p(x); see :doc:`guides`). The estimators refuse it as an
    importance proposal: use ``proposal="prior"`` or an encoder with a density.

    Parameters
    ----------
    data_dim, latent_dim : int
        D, the dimension of x, and k, that of z.
    hidden, activation : sequence of int, str
        The hidden widths of g from x towards z, and the nonlinearity (``ACTIVATIONS``).

    Attributes
    ----------
    family : str
        ``"delta"``: no density, so no importance proposal and no local family.

    Examples
    --------
    >>> import torch
    >>> from ppl_vae.guides import DeltaEncoder
    >>> encoder = DeltaEncoder(64, 2, hidden=(16,))
    >>> encoder.family, encoder.distribution(torch.rand(10, 64)).sample().shape
    ('delta', torch.Size([10, 2]))
    """

    family = "delta"

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


class FlowEncoder(PyroModule):
    """q(z | x): a diagonal Gaussian from an MLP, pushed through conditional flows.

    ``num_flows`` affine coupling layers (RealNVP), each conditioned on the MLP's last
    hidden state h(x), transform the base; they start as the identity. Why coupling,
    and how the layers are arranged: :doc:`guides`.

    Parameters
    ----------
    data_dim, latent_dim : int
        D, the dimension of x, and k, that of z.
    hidden : sequence of int
        Widths of the encoder MLP's hidden layers, from x towards z (``()``: h(x) = x).
    num_flows : int
        Number of coupling layers, >= 0 (0: q is the Gaussian base).
    activation, flow_hidden : str, sequence of int
        Nonlinearity of all networks (``ACTIVATIONS``); coupling networks' hidden widths.

    Attributes
    ----------
    family : str
        ``"flow"``.

    Examples
    --------
    >>> import torch
    >>> from ppl_vae.guides import FlowEncoder
    >>> q = FlowEncoder(64, 2, hidden=(16,)).distribution(torch.rand(10, 64))
    >>> z = q.rsample()
    >>> z.shape, q.log_prob(z).shape
    (torch.Size([10, 2]), torch.Size([10]))
    """

    family = "flow"

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        *,
        hidden: Sequence[int] = (200, 200),
        num_flows: int = 2,
        activation: str = "tanh",
        flow_hidden: Sequence[int] = (100,),
    ):
        super().__init__()
        self.data_dim = positive_dim(data_dim, "data_dim")
        self.latent_dim = positive_dim(latent_dim, "latent_dim")
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 0:
            raise ValueError(f"num_flows must be a non-negative integer, got {num_flows!r}")
        self.num_flows = num_flows
        if isinstance(flow_hidden, (str, bytes)) or not isinstance(flow_hidden, Sequence) \
                or not flow_hidden:
            raise ValueError(f"flow_hidden must be a non-empty sequence of widths, got "
                             f"{flow_hidden!r}")
        flow_hidden = [positive_dim(width, "flow_hidden") for width in flow_hidden]
        self.net = MLP(data_dim, latent_dim, latent_dim, hidden=hidden, activation=activation)
        context_dim = self.net.hidden[-1] if self.net.hidden else data_dim
        self.flows = nn.ModuleList(
            _coupling(latent_dim, context_dim, flow_hidden, activation) for _ in range(num_flows)
        )

    def _base_and_context(self, x: Tensor) -> tuple[dist.Independent, Tensor]:
        """The Gaussian base for ``x`` (..., N, D) and the context h(x) (..., N, C)."""
        *trunk, head = network(self, "net").layers
        h = x
        for layer in trunk:
            h = layer(h)
        loc, raw_scale = head(h).split(self.latent_dim, dim=-1)
        base = Normal(loc, F.softplus(raw_scale) + SCALE_FLOOR).to_event(1)
        return base, h

    def base_distribution(self, x: Tensor) -> dist.Independent:
        """The Gaussian base N(mu(x), diag(sigma(x)^2)) of q(z | x).

        Parameters
        ----------
        x : Tensor of shape (..., N, D)

        Returns
        -------
        Independent Normal with batch shape (..., N) and event shape (k,).
        """
        return self._base_and_context(x)[0]

    def distribution(self, x: Tensor) -> dist.TransformedDistribution:
        """q(z | x) for a batch.

        Parameters
        ----------
        x : Tensor of shape (..., N, D)

        Returns
        -------
        TransformedDistribution with batch shape (..., N) and event shape (k,); its
        ``log_prob`` scores any z of shape (..., N, k), drawn by it or not.
        """
        base, context = self._base_and_context(x)
        # Every second layer sees the dims reversed, and they are put back after it, so
        # that identity layers leave q equal to its base, dim for dim. A permutation
        # costs an index op and has no Jacobian; rebuilt per call to follow x's device,
        # one instance per use so that each caches its own forward pass.
        order = torch.arange(self.latent_dim - 1, -1, -1, device=x.device)
        transforms = []
        for i, flow in enumerate(network(self, "flows")):
            layer = flow.condition(context)
            transforms += [Permute(order), layer, Permute(order)] if i % 2 else [layer]
        return dist.TransformedDistribution(base, transforms)

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        q = self.distribution(x)
        with data_plate(x, idx, num_data):
            return pyro.sample("z", q)


def _coupling(latent_dim: int, context_dim: int, hidden: Sequence[int],
              activation: str) -> ConditionalAffineCoupling:
    """One conditional affine coupling layer on k dims, started at the identity."""
    kept = latent_dim // 2
    moved = latent_dim - kept
    conditioner = ConditionalDenseNN(kept, context_dim, list(hidden), param_dims=[moved, moved],
                                     nonlinearity=ACTIVATIONS[activation]())
    last = conditioner.layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return ConditionalAffineCoupling(kept, conditioner)
