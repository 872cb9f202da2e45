"""Pyro's mean-field autoguides as per-datapoint guides of the engine.

``AutoNormal`` and ``AutoDiagonalNormal`` put an independent Normal on every coordinate
of every latent site's unconstrained value, mapped back by ``biject_to(support)``: the
same map as :class:`~ppl_vae.guides.latent_space.LatentSpace`. Their parameters for
datapoint n are therefore a diagonal Gaussian q_n(u) over the model's u, and
:class:`AutoguideView` reads them as such, live, from the autoguide's own parameters
(so training the view trains the autoguide). Rows are the dataset's rows: the view
reads rows ``idx``, whatever minibatch the library runs.

Autoguides over one joint latent vector (``AutoMultivariateNormal``,
``AutoLowRankMultivariateNormal``, ``AutoIAFNormal``) couple the datapoints: there is
no per-datapoint log q, so they cannot be importance-sampling or AIS proposals.
"""

from __future__ import annotations

from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous, AutoDiagonalNormal, AutoGuide, AutoNormal
from torch import Tensor, nn

from ppl_vae.guides.latent_space import LatentSpace
from ppl_vae.guides.local import draw_latents

MEAN_FIELD = (AutoNormal, AutoDiagonalNormal)


def is_autoguide(guide) -> bool:
    return isinstance(guide, AutoGuide)


def as_autoguide_view(guide: AutoGuide, model: nn.Module, x: Tensor, plate: str,
                      num_data: int, *, proposal: bool):
    """An :class:`AutoguideView` of a mean-field autoguide; None for other autoguides
    (run as they are); a ValueError for a coupling autoguide used as a proposal."""
    if not isinstance(guide, MEAN_FIELD):
        if proposal and isinstance(guide, AutoContinuous):
            raise ValueError(
                f"{type(guide).__name__} draws one joint latent vector for all datapoints: "
                "its q couples them, so it has no per-datapoint log q and cannot be an "
                "importance-sampling or AIS proposal; use AutoNormal or "
                "AutoDiagonalNormal, an encoder, or ppl_vae.fit_local"
            )
        return None
    prepared_autoguide(guide, x)
    space = LatentSpace.of(model, x)
    view = AutoguideView(guide, space)
    view.check_rows(plate, num_data)
    return view


def prepared_autoguide(guide: AutoGuide, x: Tensor) -> None:
    """Build an autoguide's prototype on the whole dataset, as its first SVI step would."""
    if getattr(guide, "prototype_trace", None) is None:
        with torch.no_grad(), pyro.validation_enabled(False):
            guide(x)


class AutoguideView(nn.Module):
    """A mean-field autoguide as a local guide: q_n(u) = N(m_n, diag(s_n^2)).

    Parameters
    ----------
    autoguide : AutoNormal or AutoDiagonalNormal
        Set up (its prototype built) on the whole dataset; a submodule, so its
        parameters are this guide's.
    space : LatentSpace
        The model's latents.
    """

    family = "diag"

    def __init__(self, autoguide: AutoGuide, space: LatentSpace):
        super().__init__()
        self.autoguide = autoguide
        self.space = space
        self.latent_dim = space.dim

    def check_rows(self, plate: str, num_data: int) -> None:
        """Refuse an autoguide whose per-datapoint rows are not the dataset's rows."""
        sites = dict(self.autoguide.prototype_trace.iter_stochastic_nodes())
        if set(sites) != set(self.space.names):
            raise ValueError(
                f"the autoguide's sites {sorted(sites)} are not the model's latent sites "
                f"{sorted(self.space.names)}"
            )
        for name, site in sites.items():
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            rows = [f.full_size or f.size for f in frames]
            if [f.name for f in frames] != [plate] or rows != [num_data]:
                shown = [(f.name, f.full_size or f.size) for f in frames]
                raise ValueError(
                    f"the autoguide's site {name!r} holds rows for plates {shown}, but the "
                    f"dataset has {num_data} rows of plate {plate!r}: for a subset of the "
                    "rows it was set up on, pass idx= (their rows) and num_data=; otherwise "
                    "set it up on the whole dataset (its first call fixes its rows)"
                )

    def parameters_u(self) -> tuple[Tensor, Tensor]:
        """Location and scale of every row over u, each of shape (N, d)."""
        if isinstance(self.autoguide, AutoDiagonalNormal):
            pieces = dict(self._unpacked(self.autoguide.loc))
            scales = dict(self._unpacked(self.autoguide.scale))
        else:
            pieces = {n: attrgetter(n)(self.autoguide.locs) for n in self.space.names}
            scales = {n: attrgetter(n)(self.autoguide.scales) for n in self.space.names}
        loc = torch.cat([self._rows_of(pieces[s.name], s) for s in self.space.sites], -1)
        scale = torch.cat([self._rows_of(scales[s.name], s) for s in self.space.sites], -1)
        return loc, scale

    def _unpacked(self, flat: Tensor):
        for site, value in self.autoguide._unpack_latent(flat):
            yield site["name"], value

    @staticmethod
    def _rows_of(value: Tensor, site) -> Tensor:
        return value.reshape(value.shape[0], site.size)

    def joint_distribution(self, x: Tensor | None = None, idx: Tensor | None = None):
        """q_n(u) of the rows ``idx`` (all rows when None): batch (B,), event (d,)."""
        loc, scale = self.parameters_u()
        if idx is not None:
            loc, scale = loc[idx], scale[idx]
        return dist.Normal(loc, scale).to_event(1)

    def distribution(self, x: Tensor | None = None, idx: Tensor | None = None):
        """Same as :meth:`joint_distribution`."""
        return self.joint_distribution(x, idx)

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        return draw_latents(self.joint_distribution(x, idx), self.space, x, idx, num_data)
