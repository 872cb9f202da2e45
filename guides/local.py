"""Local (non-amortized) guides: a separate Gaussian q_n(z) for every datapoint.

They hold full-size parameters ``[num_data, ...]`` and read the rows ``idx`` of the
minibatch, so one parameter tensor fits every datapoint at once. Fitted with the model
frozen, they give the best member of their family for each datapoint: the reference
against which an amortized encoder's amortization gap is measured.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import Tensor, nn

from ppl_vae.models.blocks import data_plate, positive_dim

FAMILIES = ("diag", "full")


class _Local(PyroModule):
    """Shared plumbing: a location per datapoint, and how rows are read."""

    family: str

    def __init__(self, num_data: int, latent_dim: int):
        super().__init__()
        self.num_data = positive_dim(num_data, "num_data")
        self.latent_dim = positive_dim(latent_dim, "latent_dim")
        # The prior N(0, I) of every model in this library: a safe start for SVI.
        self.loc = nn.Parameter(torch.zeros(num_data, latent_dim))

    @classmethod
    def from_encoder(cls, encoder, x: Tensor):
        """A local guide that starts where ``encoder`` puts each row of ``x``.

        Parameters
        ----------
        encoder : an amortized guide with ``distribution(x)`` (or whose site ``"z"`` is
            a Normal or MultivariateNormal).
        x : Tensor of shape (N, D)
            The whole dataset: row n of the local guide starts at q(z | x_n).
        """
        return cls.from_distribution(encoder_distribution(encoder, x))

    @classmethod
    def from_distribution(cls, q):
        """A local guide whose row n equals the batch element n of ``q``.

        Parameters
        ----------
        q : Independent(Normal) or MultivariateNormal with batch shape (N,), event (k,)
        """
        raise NotImplementedError

    def distribution(self, x: Tensor | None = None, idx: Tensor | None = None):
        """q_n(z) of the rows ``idx``, batch shape (B,) and event shape (k,).

        ``x`` is not read; with ``idx=None`` it must hold all ``num_data`` rows (when
        given), and all rows are returned.
        """
        raise NotImplementedError

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        q = self.distribution(x, idx)
        with data_plate(x, idx, num_data):
            return pyro.sample("z", q)

    def _rows(self, x: Tensor | None, idx: Tensor | None):
        if idx is not None:
            return idx
        if x is not None and len(x) != self.num_data:
            raise ValueError(
                f"without idx, x must hold all {self.num_data} rows the local guide was "
                f"built for, got {len(x)}; pass idx to read a subset"
            )
        return slice(None)


class LocalNormal(_Local):
    """q_n(z) = N(m_n, diag(s_n^2)): a diagonal (mean-field) Gaussian per datapoint.

    Parameters
    ----------
    num_data : int
        N, the number of datapoints; ``loc`` and ``log_scale`` have shape (N, k).
    latent_dim : int
        k, the dimension of z.

    Every row starts at the prior N(0, I); use :meth:`from_encoder` to start each row
    at an encoder's output instead.
    """

    family = "diag"

    def __init__(self, num_data: int, latent_dim: int):
        super().__init__(num_data, latent_dim)
        self.log_scale = nn.Parameter(torch.zeros(num_data, latent_dim))

    @classmethod
    def from_distribution(cls, q) -> LocalNormal:
        """A LocalNormal whose row n equals the batch element n of ``q``.

        Parameters
        ----------
        q : Independent(Normal) with batch shape (N,) and event shape (k,); a
            MultivariateNormal gives its marginal means and standard deviations.
        """
        if family_of(q) == "full":
            loc, scale = q.mean.detach(), q.variance.detach().sqrt()
        else:
            loc, scale = _diagonal_parts(q)
        guide = cls(*loc.shape).to(loc)
        with torch.no_grad():
            guide.loc.copy_(loc)
            guide.log_scale.copy_(scale.log())
        return guide

    def distribution(self, x: Tensor | None = None, idx: Tensor | None = None):
        rows = self._rows(x, idx)
        return dist.Normal(self.loc[rows], self.log_scale[rows].exp()).to_event(1)


class LocalMVN(_Local):
    """q_n(z) = N(m_n, L_n L_n^T): a full-covariance Gaussian per datapoint.

    L_n is lower triangular: its strictly-lower entries are free parameters and its
    diagonal is ``exp`` of a free parameter, so every L_n is a valid Cholesky factor.

    Parameters
    ----------
    num_data : int
        N, the number of datapoints; ``loc`` and ``log_diag`` have shape (N, k),
        ``off_diag`` shape (N, k (k - 1) / 2).
    latent_dim : int
        k, the dimension of z.

    Every row starts at the prior N(0, I); use :meth:`from_encoder` to start each row
    at an encoder's output instead.
    """

    family = "full"

    def __init__(self, num_data: int, latent_dim: int):
        super().__init__(num_data, latent_dim)
        self.log_diag = nn.Parameter(torch.zeros(num_data, latent_dim))
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.off_diag = nn.Parameter(torch.zeros(num_data, len(rows)))
        # Where off_diag goes in L: structure, not state, so kept out of state_dict.
        self.register_buffer("_tril_rows", rows, persistent=False)
        self.register_buffer("_tril_cols", cols, persistent=False)

    def scale_tril(self, idx: Tensor | None = None) -> Tensor:
        """Cholesky factors L_n of the rows ``idx`` (all when None), shape (B, k, k)."""
        rows = slice(None) if idx is None else idx
        log_diag = self.log_diag[rows]
        tril = torch.diag_embed(log_diag.exp())
        tril[..., self._tril_rows, self._tril_cols] = self.off_diag[rows]
        return tril

    @classmethod
    def from_distribution(cls, q) -> LocalMVN:
        if family_of(q) == "diag":
            loc, scale = _diagonal_parts(q)
            tril = torch.diag_embed(scale)
        else:
            loc, tril = q.loc, q.scale_tril
        loc = loc.detach()
        tril = tril.detach().expand(*loc.shape, loc.shape[-1])
        guide = cls(*loc.shape).to(loc)
        with torch.no_grad():
            guide.loc.copy_(loc)
            guide.log_diag.copy_(tril.diagonal(dim1=-2, dim2=-1).log())
            guide.off_diag.copy_(tril[..., guide._tril_rows, guide._tril_cols])
        return guide

    def distribution(self, x: Tensor | None = None, idx: Tensor | None = None):
        rows = self._rows(x, idx)
        tril_rows = None if isinstance(rows, slice) else rows
        return dist.MultivariateNormal(self.loc[rows], scale_tril=self.scale_tril(tril_rows))


LOCAL_GUIDES = {"diag": LocalNormal, "full": LocalMVN}


def family_of(q) -> str:
    """``"diag"`` or ``"full"``: the Gaussian family of a per-datapoint distribution ``q``.

    Raises ValueError for anything else (a point mass, a non-Gaussian q), which has no
    local Gaussian counterpart.
    """
    if isinstance(q, (torch.distributions.MultivariateNormal,
                      torch.distributions.LowRankMultivariateNormal)):
        return "full"
    base = q
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if isinstance(base, torch.distributions.Normal):
        return "diag"
    raise ValueError(
        f"expected q(z | x) to be a Normal (diagonal) or MultivariateNormal (full), got "
        f"{type(base).__name__}: only Gaussian encoders have a local Gaussian counterpart"
    )


def encoder_distribution(encoder, x: Tensor):
    """q(z | x) of an amortized guide, batch shape (N,), detached from its parameters.

    Uses ``encoder.distribution(x)`` when the encoder has it; otherwise runs the guide
    once and reads the distribution of its site ``"z"``.
    """
    with torch.no_grad():
        if callable(getattr(encoder, "distribution", None)):
            return encoder.distribution(x)
        trace = poutine.trace(encoder).get_trace(x)
    if "z" not in trace.nodes:
        raise ValueError(
            f"{type(encoder).__name__} has no distribution(x) method and no sample site 'z'"
        )
    return trace.nodes["z"]["fn"]


def _diagonal_parts(q) -> tuple[Tensor, Tensor]:
    base = q
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    loc, scale = torch.broadcast_tensors(base.loc, base.scale)
    return loc.detach(), scale.detach()
