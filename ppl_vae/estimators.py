"""Per-datapoint importance sampling: log weights, log p(x), the ELBO, and diagnostics.

Every estimator starts from the log weights

    log w[k, n] = log p(x_n, z_kn) - log q(z_kn | x_n),    z_kn ~ q(. | x_n),

and reduces over the K samples of each datapoint last. (Pyro's ``Importance`` and
``vectorized_importance_weights`` weight a whole batch jointly, which answers a different
question.) The model and guide are reused as they are: no density is written twice.

What the estimators refuse, before any work: a latent site outside the ``"data"`` plate
or without ``.to_event`` for its event dims, a discrete latent, a guide that lacks a site
for one of the model's latents or has a site the model does not have, and a point-mass
guide. A proposal draw outside a latent's support (a Normal guide on a positive latent)
scores log w = -inf: it gets weight zero, which keeps log p(x) a valid estimate (the
weights still average to p(x)), and makes the ELBO -inf, its true value for such a guide.

Draws depend only on (seed, datapoint index): see :mod:`ppl_vae.seeding`. Under
torch.distributed, rows are sharded over the processes and every process gets the whole
result (:mod:`ppl_vae.distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyro
import torch
from pyro import poutine
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vae.block_noise import BlockNoise, Group, gaussian_latents, group_size, groups
from ppl_vae.densities import log_density, refuse_nan
from ppl_vae.distributed import gathered, my_share
from ppl_vae.programs import as_programs, required_guide
from ppl_vae.seeding import ROW_BLOCK, base_seed, blocks, caller_rng_kept, check_seed, seed_torch
from ppl_vae.settings import module_local
from ppl_vae.structure import check_guide, check_rows, check_structure
from ppl_vae.validation import as_data, one_of, positive_int

PROPOSALS = ("guide", "prior")

# Samples per seeded unit of work: a unit is that many samples of ROW_BLOCK (16) rows,
# run as one vectorized call. It is part of what the draws of a seeded evaluation are, so
# it depends on nothing but the data's width D (not on the call, its chunks or its
# processes): SAMPLE_BLOCK for wide data (256 x 16 samples of a 784-pixel decoder keep
# each temporary near 13 MB), more for narrow data, where each call's Python would
# otherwise cost more than its arithmetic (UNIT_VALUES values of x per unit).
SAMPLE_BLOCK = 256
MAX_SAMPLE_BLOCK = 4096
UNIT_VALUES = 2**18
# Seeded units of work from which an estimate shows a progress bar (~1 s of a VAE).
PROGRESS_UNITS = 64


@module_local
def log_weights(
    model,
    guide,
    x,
    num_samples: int,
    *,
    proposal: str = "guide",
    idx: Tensor | None = None,
    num_data: int | None = None,
    seed: int | None = None,
    plate: str | None = None,
    progress: bool = True,
) -> Tensor:
    """Importance log weights log p(x, z) - log q(z | x), one column per datapoint.

    Parameters
    ----------
    model, guide : Pyro programs
        Taking the data ``x``, every latent site in the data plate, a guide site for
        each of the model's latents (what is accepted: :doc:`estimators`).
    x : Tensor or ndarray of shape (N, D)
    num_samples : int
        K, samples per datapoint.
    proposal : {"guide", "prior"}
        ``"prior"`` draws z from the model's prior (naive Monte Carlo): the weights are
        then the likelihoods p(x | z).
    idx, num_data, seed : optional
        Rows of ``x`` in the dataset (a local guide reads these) and its size; row n's
        draws depend only on ``seed`` and ``idx[n]``.
    plate, progress : optional
        The model's data plate, when it cannot be told; a progress bar for long work.

    Returns
    -------
    Tensor of shape (K, N)
        -inf where a draw fell outside a latent's support.
    """
    return _weights(Job.checked(model, guide, x, num_samples, proposal, idx, num_data, seed,
                                 plate, progress))


def log_weights_trusted(model, guide, x: Tensor, num_samples: int, seed: int) -> Tensor:
    """The core of :func:`log_weights` for callers inside the library that have checked
    the model, the guide as a proposal, ``x`` (all rows of the dataset) and the seed."""
    idx = torch.arange(len(x), device=x.device)
    return _weights(Job(model, guide, x, idx, len(x), num_samples, "guide", seed))


def _weights(job: Job) -> Tensor:
    out = job.x.new_zeros(job.num_samples, len(job.x))
    for positions, samples, lw in job.units():
        out[samples, positions] = lw
    return gathered(out, job.mine(), dim=1)


@module_local
def log_marginal(model, guide, x, num_samples: int = 1000, **kwargs) -> Tensor:
    """Importance-sampled log p(x) per datapoint, Tensor of shape (N,).

    log p(x_n) ~= logsumexp_k log w[k, n] - log K; a lower bound in expectation that
    tightens as K grows. It streams over K with an exact running logsumexp, so memory
    stays bounded whatever K is. Keywords as for :func:`log_weights`.

    Examples
    --------
    With the exact posterior as the proposal every weight is p(x), whatever K:

    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA
    >>> from ppl_vae.guides import ExactPosterior
    >>> _ = torch.manual_seed(0)
    >>> model, x = PPCA(5, 2), torch.randn(8, 5)
    >>> log_px = ppl_vae.log_marginal(model, ExactPosterior(model), x, num_samples=10, seed=0)
    >>> torch.allclose(log_px, model.score_samples(x), atol=1e-4)
    True
    """
    job = Job.checked(model, guide, x, num_samples, **kwargs)
    running = torch.full((len(job.x),), -torch.inf, dtype=job.x.dtype, device=job.x.device)
    for positions, _, lw in job.units():
        running[positions] = torch.logaddexp(running[positions], torch.logsumexp(lw, 0))
    return gathered(running - math.log(job.num_samples), job.mine(), dim=0)


@module_local
def elbo(model, guide, x, num_samples: int = 100, **kwargs) -> Tensor:
    """Monte Carlo ELBO per datapoint, E_q[log w], Tensor of shape (N,).

    Streams over K like :func:`log_marginal`. Keywords as for :func:`log_weights`.

    Examples
    --------
    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA
    >>> from ppl_vae.guides import LinearEncoder
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(8, 2) @ torch.randn(2, 5) + torch.randn(8, 5)
    >>> model, guide = PPCA.from_data(x, latent_dim=2), LinearEncoder(5, 2)
    >>> bound = ppl_vae.elbo(model, guide, x, num_samples=100, seed=0)
    >>> bound.shape, bool((bound < model.score_samples(x)).all())  # below the exact log p(x)
    (torch.Size([8]), True)
    """
    job = Job.checked(model, guide, x, num_samples, **kwargs)
    total = torch.zeros(len(job.x), dtype=job.x.dtype, device=job.x.device)
    for positions, _, lw in job.units():
        total[positions] += lw.sum(0)
    return gathered(total / job.num_samples, job.mine(), dim=0)


@dataclass(frozen=True)
class Diagnostics:
    """Per-datapoint estimates and the health of their importance weights.

    Attributes (each a Tensor of shape (N,))
    ----------------------------------------
    log_marginal, log_marginal_se : log p(x) and its standard error (delta method).
    elbo, elbo_se : the ELBO and its standard error.
    ess : effective sample size of the normalized weights, in [1, K].
    khat : PSIS Pareto k-hat; above 0.7 the log p(x) estimate is unreliable.
    """

    log_marginal: Tensor
    log_marginal_se: Tensor
    elbo: Tensor
    elbo_se: Tensor
    ess: Tensor
    khat: Tensor
    num_samples: int

    def summary(self) -> dict:
        """Means over datapoints, with the standard error of each mean."""
        out = {"num_samples": self.num_samples, "num_data": len(self.elbo)}
        for name, values in asdict(self).items():
            if isinstance(values, Tensor) and not name.endswith("_se"):
                out[name] = float(values.mean())
                out[name + "_se"] = mean_se(values, getattr(self, name + "_se", None))
        out["khat_above_0.7"] = float((self.khat > 0.7).double().mean())
        return out


@module_local
def diagnostics(model, guide, x, num_samples: int = 1000, **kwargs) -> Diagnostics:
    """log p(x), ELBO, standard errors, ESS and PSIS k-hat per datapoint.

    Keywords as for :func:`log_weights`.

    Examples
    --------
    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA
    >>> from ppl_vae.guides import LinearEncoder
    >>> _ = torch.manual_seed(0)
    >>> model, guide, x = PPCA(5, 2), LinearEncoder(5, 2), torch.randn(8, 5)
    >>> d = ppl_vae.diagnostics(model, guide, x, num_samples=200, seed=0)
    >>> d.khat.shape, bool(((d.ess >= 1) & (d.ess <= 200)).all())
    (torch.Size([8]), True)
    """
    return summarize_log_weights(log_weights(model, guide, x, num_samples, **kwargs))


def summarize_log_weights(lw: Tensor) -> Diagnostics:
    """:class:`Diagnostics` from log weights of shape (K, N)."""
    k = lw.shape[0]
    lme = torch.logsumexp(lw, 0) - math.log(k)
    w = (lw - lme).exp()  # weights divided by their mean, per datapoint
    return Diagnostics(
        log_marginal=lme,
        log_marginal_se=_std(w) / math.sqrt(k),
        elbo=lw.mean(0),
        elbo_se=_std(lw) / math.sqrt(k),
        ess=k**2 / w.square().sum(0),
        khat=pareto_khat(lw),
        num_samples=k,
    )


# Log weights of one datapoint that span less than this (nats) are equal for every purpose:
# the estimate cannot move by more on these draws, whatever the tail.
_TIED_SPAN = 1e-4


def pareto_khat(lw: Tensor) -> Tensor:
    """PSIS k-hat per datapoint (``arviz.psislw``), from log weights of shape (K, N).

    NaN with fewer than 2 samples, where no tail can be fitted. A datapoint whose K log
    weights span less than 1e-4 nats (an exact posterior proposal, up to float32 rounding)
    gets 0, the k-hat of a light tail: a Pareto fit to such ties returns inf or noise, which
    would flag the most reliable estimate there is as unreliable.
    """
    if lw.shape[0] < 2:
        return torch.full((lw.shape[1],), float("nan"), dtype=lw.dtype, device=lw.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz

        # On the CPU first: a GPU's float64 copy of all the weights would double its memory.
        _, khat = arviz.psislw(lw.T.cpu().double().numpy().copy(), reff=1.0)
    khat = torch.as_tensor(khat, dtype=lw.dtype).reshape(lw.shape[1]).to(lw.device)
    tied = (lw.amax(0) - lw.amin(0)) < _TIED_SPAN
    return khat.masked_fill(tied, 0.0)


def _std(values: Tensor) -> Tensor:
    if values.shape[0] < 2:
        return torch.full_like(values[0], float("nan"))
    return values.std(0)


def mean_se(values: Tensor, per_point_se: Tensor | None) -> float:
    """Standard error of a mean over datapoints: their spread plus the Monte Carlo noise."""
    n = len(values)
    spread = float(values.var()) / n if n > 1 else 0.0
    noise = 0.0
    if per_point_se is not None:
        noise = float(per_point_se.nan_to_num().square().sum()) / n**2
    return math.sqrt(spread + noise)


@dataclass(frozen=True)
class Job:
    """One checked estimation: data, rows, and how the draws are made."""

    model: object
    guide: object
    x: Tensor
    idx: Tensor
    num_data: int
    num_samples: int
    proposal: str
    seed: int
    progress: bool = False
    # Whether every latent draw of the proposal is Gaussian noise (see block_noise), when
    # the boundary's trace of it has told; found by a trace of its own otherwise.
    gaussian: bool | None = None

    @classmethod
    def checked(cls, model, guide, x, num_samples, proposal="guide", idx=None,
                num_data=None, seed=None, plate=None, progress=True) -> Job:
        """Validate everything at the public boundary, before any work."""
        x = as_data(x, model)
        num_samples = positive_int(num_samples, "num_samples")
        one_of(proposal, PROPOSALS, "proposal")
        if proposal == "guide":
            required_guide(guide, ", or proposal='prior' to weight draws from the prior")
        seed = check_seed(seed)
        idx, num_data = check_rows(x, idx, num_data)
        model, guide = as_programs(model, guide if proposal == "guide" else None, x,
                                   plate=plate, num_data=num_data)
        gaussian = None
        with caller_rng_kept(seed is not None):
            check_structure(model, x, idx, num_data)
            if proposal == "guide":
                gaussian = gaussian_latents(check_guide(model, guide, x, idx, num_data))
            seed = base_seed(seed)
        return cls(model, guide, x, idx, num_data, num_samples, proposal, seed, progress,
                   gaussian)

    def sample_slices(self) -> Iterator[tuple[int, int, int]]:
        """(number, first sample, samples) of each seeded sample block of K."""
        size = sample_block(self.x.shape[1])
        for number, start in enumerate(range(0, self.num_samples, size)):
            yield number, start, min(size, self.num_samples - start)

    @functools.cached_property
    def my_groups(self) -> list[Group]:
        """This process's groups of row blocks (all of them without torch.distributed)."""
        return self._shares[0]

    @functools.cached_property
    def _shares(self) -> tuple[list[Group], list[Group]]:
        """(groups this process owns, groups it runs). A process that owns none runs one
        it does not own, its results discarded, so that every process learns what a call
        returns (its sites, their shapes) as the others do."""
        width, samples = self.x.shape[1], min(self.num_samples, sample_block(self.x.shape[1]))
        size = group_size(width, samples)
        if size > 1 and not self._gaussian_proposal():
            size = 1
        every = groups(list(blocks(self.idx)), size)
        owned = my_share(every)
        return owned, owned or every[:1]

    def _gaussian_proposal(self) -> bool:
        if self.gaussian is not None:
            return self.gaussian
        proposal = self.guide if self.proposal == "guide" else self.model
        x, idx = self.x[:1], self.idx[:1]
        with caller_rng_kept(), torch.no_grad(), pyro.validation_enabled(False):
            return gaussian_latents(poutine.trace(proposal).get_trace(x, idx, self.num_data))

    def mine(self) -> Tensor:
        """Which rows this process computes, BoolTensor of shape (N,)."""
        mask = torch.zeros(len(self.x), dtype=torch.bool)
        for group in self.my_groups:
            mask[group.positions()] = True
        return mask

    def calls(self) -> Iterator[Call]:
        """Every seeded call of the model: a group of row blocks and a sample block."""
        groups_ = self._shares[1]
        total = len(groups_) * math.ceil(self.num_samples / sample_block(self.x.shape[1]))
        bar = tqdm(total=total, disable=not self.progress or total < PROGRESS_UNITS,
                   desc="importance sampling", unit="block")
        with bar:
            for group in groups_:
                rows = group.rows().to(self.x.device)
                real, positions = group.real(), group.positions()
                # Every slot real (all but a call's last groups): a view, not a copy.
                real = slice(None) if bool(real.all()) else real.to(self.x.device)
                xb, ib = self.x[rows], self.idx[rows]
                for number, start, k in self.sample_slices():
                    yield Call(self, group, number, xb, ib, real, positions.to(self.x.device),
                               slice(start, start + k))
                    bar.update()

    def units(self) -> Iterator[tuple[Tensor, slice, Tensor]]:
        """(row positions, sample slice, log weights [S, rows]) for every seeded unit.

        The caller's random state is restored afterwards.
        """
        with caller_rng_kept(), torch.no_grad(), pyro.validation_enabled(False):
            for call in self.calls():
                with call.drawing():
                    lw = _unit(self.model, self.guide, call.x, call.idx, self.num_data,
                               call.num_samples, self.proposal)
                yield call.positions, call.samples, lw[:, call.real]


@dataclass(frozen=True)
class Call:
    """One seeded call: ``x``/``idx`` the group's padded rows, ``real`` its slots that hold
    their own row (at call ``positions``; ``slice(None)`` when all do), ``samples`` the
    slice of K it draws."""

    job: Job
    group: Group
    number: int
    x: Tensor
    idx: Tensor
    real: Tensor | slice
    positions: Tensor
    samples: slice

    @property
    def num_samples(self) -> int:
        return self.samples.stop - self.samples.start

    def drawing(self):
        """The context in which the call's draws are made (see :mod:`ppl_vae.block_noise`)."""
        members = self.group.members
        if len(members) == 1:
            seed_torch(self.job.seed, members[0].number, self.number)
            return contextlib.nullcontext()
        # Stray draws (none in a Gaussian proposal) are seeded too, per group.
        seed_torch(self.job.seed, -1 - self.group.number, self.number)
        return BlockNoise(self.group, self.job.seed, self.number, self.x.device)


def sample_block(data_dim: int) -> int:
    """Samples per seeded unit for data of width ``data_dim`` (see SAMPLE_BLOCK)."""
    return max(SAMPLE_BLOCK, min(MAX_SAMPLE_BLOCK, UNIT_VALUES // (ROW_BLOCK * data_dim)))


def _unit(model, guide, x, idx, num_data, k, proposal) -> Tensor:
    shape = (k, len(x))
    with pyro.plate("particles", k, dim=-2):
        if proposal == "prior":
            model_trace = poutine.trace(model).get_trace(x, idx, num_data)
            lw = log_density(model_trace, shape, observed=True)
            refuse_nan(lw, {"model": model_trace}, shape, idx)
            return lw
        guide_trace = poutine.trace(guide).get_trace(x, idx, num_data)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(x, idx, num_data)
    # log q is every site of the guide, as in Pyro's ELBOs: a pyro.factor there (a
    # log-Jacobian, say) is an observed site of the guide's.
    lw = log_density(model_trace, shape) - log_density(guide_trace, shape)
    refuse_nan(lw, {"model": model_trace, "guide": guide_trace}, shape, idx)
    return lw
