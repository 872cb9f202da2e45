"""The loss of a local guide's fit, with its rows shared out over torch.distributed ranks.

A local guide has one set of parameters per datapoint and the ELBO is a sum over
datapoints, so row n's parameters get the gradient of row n's term only; Adam updates
each element on its own. So rows can be fitted by different processes, provided each
row sees the same random draws as in one process. Here every rank traces the guide on
the whole minibatch (a cheap draw: the same global random stream on every rank, seeded
alike), and evaluates the expensive model only on the rows it owns. The rows it does not
own get a zero gradient, and Adam leaves a parameter whose gradients were always zero
exactly where it started; after the fit, :func:`gather_rows` assembles the rows of
every rank. The result equals a one-process fit up to the rounding of the model's
arithmetic on fewer rows.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from torch import Tensor, nn

from ppl_vae.densities import log_density
from ppl_vae.distributed import gathered, rank_and_size
from ppl_vae.gradients import stopped
from ppl_vae.objectives import DifferentiableELBO
from ppl_vae.row_convergence import Noised


def owned_rows(num_data: int, device=None) -> Tensor | None:
    """Which dataset rows this rank fits, BoolTensor (num_data,): every world-size-th,
    from its rank. None without torch.distributed (all rows)."""
    rank, world = rank_and_size()
    if world == 1:
        return None
    return torch.arange(num_data, device=device) % world == rank


class LocalELBO(DifferentiableELBO):
    """``Trace_ELBO`` with vectorized particles, over the rows in ``owned``.

    Parameters
    ----------
    num_particles : int
    latent_names : list of str
        The model's latent sites (the guide's sites of the same names are conditioned on).
    owned : BoolTensor of shape (num_data,), optional
        Rows whose terms enter the loss; all when None.
    sticking : bool
        The guide's gradient by sticking the landing (``ppl_vae.gradients``): log q
        of the draws is scored with the guide's parameters stopped, which drops the
        score term (zero in expectation). The loss's value is unchanged.
    """

    def __init__(self, num_particles: int, latent_names: list[str], owned: Tensor | None,
                 *, sticking: bool = False):
        super().__init__(num_particles=num_particles, max_plate_nesting=1,
                         vectorize_particles=True)
        self.latent_names, self.owned, self.sticking = list(latent_names), owned, sticking

    def differentiable_loss(self, model, guide, x, idx=None, num_data=None) -> Tensor:
        """Minus this rank's share of the ELBO, scaled to the whole dataset."""
        values, _ = self._owned_terms(model, guide, x, idx, num_data, self.sticking)
        return -values.sum() * (num_data / len(x))

    def row_elbo(self, model, guide, x, idx, num_data) -> Tensor:
        """The ELBO estimate of every row of the minibatch, shape (B,): the mean over the
        ``num_particles`` draws of log p(x_n, z) - log q_n(z); NaN for rows another
        rank owns."""
        values, keep = self._owned_terms(model, guide, x, idx, num_data)
        if keep is None:
            return values
        out = torch.full((len(x),), torch.nan, dtype=values.dtype, device=values.device)
        out[keep] = values
        return out

    def _owned_terms(self, model, guide, x, idx, num_data, sticking=False
                     ) -> tuple[Tensor, Tensor | None]:
        """Per-row ELBO estimates (B',) of the owned rows, and which rows they are."""
        k, batch = self.num_particles, len(x)
        with pyro.plate("particles", k, dim=-2):
            guide_trace = poutine.trace(guide).get_trace(x, idx, num_data)
        log_q = (_stopped_log_q(guide, guide_trace, k, x, idx, num_data) if sticking
                 else log_density(guide_trace, (k, batch)))
        values = {name: guide_trace.nodes[name]["value"] for name in self.latent_names}
        keep = None
        if self.owned is not None:
            keep = self.owned[idx]
            if not bool(keep.any()):  # nothing of this minibatch is ours
                return log_q.mean(0)[:0], keep
            log_q, x, idx = log_q[:, keep], x[keep], idx[keep]
            values = {name: value[:, keep] for name, value in values.items()}
        with pyro.plate("particles", k, dim=-2):
            conditioned = poutine.condition(model, data=values)
            model_trace = poutine.trace(conditioned).get_trace(x, idx, num_data)
        log_p = log_density(model_trace, (k, len(x)))
        return (log_p - log_q).mean(0), keep


def _stopped_log_q(guide, guide_trace, k, x, idx, num_data) -> Tensor:
    """log q (K, B) of the guide's draws in ``guide_trace`` with its parameters stopped.

    The draws keep their path to the parameters. A ``Noised`` guide is replayed without
    its noise: the replayed values make the draw from the noise needless.
    """
    inner = guide.guide if isinstance(guide, Noised) else guide
    if isinstance(guide, Noised) and guide.whole:
        idx = None
    with stopped(inner), pyro.plate("particles", k, dim=-2):
        replayed = poutine.trace(poutine.replay(inner, trace=guide_trace))
        return log_density(replayed.get_trace(x, idx, num_data), (k, len(x)))


def gather_rows(guide: nn.Module, owned: Tensor | None) -> None:
    """Give every rank every row of ``guide``'s per-datapoint parameters, in place."""
    if owned is None:
        return
    with torch.no_grad():
        for param in guide.parameters():
            param.copy_(gathered(param, owned, dim=0))
