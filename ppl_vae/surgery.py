"""ELBO surgery: the average KL term split into mutual information and marginal KL.

Averaged over a dataset x_1..x_N, the ELBO is a reconstruction term minus a KL term,
and the KL term splits again (Hoffman & Johnson, 2016):

    ELBO           = reconstruction - kl
    reconstruction = (1/N) sum_n E_q(z|x_n) log p(x_n | z)
    kl             = (1/N) sum_n E_q(z|x_n) [log q(z | x_n) - log p(z)]
                   = I_q(x; z) + KL(q(z) || p(z)),

with q(z) = (1/N) sum_m q(z | x_m) the aggregate posterior and I_q(x; z) the mutual
information between the datapoint's index and z under q(n, z) = q(z | x_n) / N, at most
log N. A small KL with a large marginal KL means the latents carry little about x; a
large KL that is mostly mutual information means they are used.

The estimator draws K values z_nk ~ q(. | x_n) and scores every draw under every
datapoint's guide, so that log q(z_nk) = logsumexp_m log q(z_nk | x_m) - log N is the
aggregate posterior's exact log density at the draw; the only Monte Carlo error is that
of the outer expectation. Scoring replays the draw's values (every sample site of the
guide, auxiliary ones included, except point masses, which the guide recomputes) into
the guide run on x_m, and reads its own log_prob: no density is written twice, and any
guide the estimators accept works, flows and local guides included. The N^2 K scores
are streamed over chunks of (draw, datapoint) pairs, so memory is O(chunk_size + N K d)
whatever N is.

"Latent" means all of the model's latent sites jointly: for a hierarchical model log p(z)
is the prior of every site (p(z2 | z1) p(z1)), and observed sites make the
reconstruction term, so ``reconstruction - kl`` is the ELBO exactly.

The report, its JSON form and its figure live in :mod:`ppl_vae.surgery_report`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from ppl_vae.densities import log_density
from ppl_vae.distributed import gathered
from ppl_vae.estimators import Job, mean_se
from ppl_vae.guides.latent_space import LatentSpace
from ppl_vae.programs import required_guide
from ppl_vae.seeding import caller_rng_kept
from ppl_vae.settings import module_local
from ppl_vae.structure import check_structure, is_point_mass
from ppl_vae.surgery_report import SurgeryReport, plot_kl_per_dim
from ppl_vae.validation import positive_int, positive_number

__all__ = ["ACTIVE_THRESHOLD", "SurgeryReport", "elbo_surgery", "plot_kl_per_dim"]

# Burda, Grosse & Salakhutdinov (2016): a unit is active when Cov_x(E_q[u | x]) > 0.01.
ACTIVE_THRESHOLD = 0.01
# Most draws scored in one call of the guide; the datapoints per call follow from
# chunk_size. Larger blocks run the encoder's network on x_m fewer times.
DRAW_BLOCK = 1024
# How far (nats, relative to 1 + |log q|) the guide's replayed score of its own draw may
# sit from the density it drew with before the guide is called irreproducible.
REPLAY_TOLERANCE = 1e-3


@module_local
def elbo_surgery(
    model,
    guide,
    x,
    *,
    num_samples: int = 8,
    threshold: float = ACTIVE_THRESHOLD,
    chunk_size: int = 2**18,
    idx: Tensor | None = None,
    num_data: int | None = None,
    seed: int | None = None,
    plate: str | None = None,
) -> SurgeryReport:
    """Split the ELBO into reconstruction, mutual information and marginal KL.

    Costs N^2 K guide densities, streamed; cost, memory and seeding: :doc:`surgery`.

    Parameters
    ----------
    model, guide : Pyro programs
        As for :func:`ppl_vae.elbo`: every latent site in the data plate.
    x : Tensor or ndarray of shape (N, D)
        The datapoints whose aggregate posterior is measured.
    num_samples : int
        K, draws per datapoint.
    threshold : float
        A coordinate is active when Cov_x(E_q[u | x]) exceeds it (Burda et al., 2016).
    chunk_size : int
        Most (draw, datapoint) pairs scored in one call of the guide (memory only).
    idx, num_data, seed, plate : optional
        As for :func:`ppl_vae.elbo`; the draws are those of ``elbo`` with this seed.

    Returns
    -------
    SurgeryReport

    Raises
    ------
    ValueError
        On bad input (as :func:`ppl_vae.elbo`), a ``threshold`` that is not a positive
        number or a ``chunk_size`` that is not a positive integer, before any work.
    """
    threshold = positive_number(threshold, "threshold")
    chunk_size = positive_int(chunk_size, "chunk_size")
    required_guide(guide)  # before Job's refusal, whose hint (proposal='prior') is not ours
    job = Job.checked(model, guide, x, num_samples, "guide", idx, num_data, seed, plate,
                      progress=False)
    with caller_rng_kept():
        space = check_structure(job.model, job.x, job.idx, job.num_data)
    drawn = _draw(job, space)
    log_qbar, own_score = _aggregate(job, drawn, chunk_size)
    _check_replay(own_score, drawn.log_q, drawn.mine)
    return _report(job, space, drawn, log_qbar, own_score, threshold)


@dataclass
class _Drawn:
    """What the first pass keeps: log densities (K, N), the guide's draws of this
    process's rows, and per-coordinate sums (N, d)."""

    log_lik: Tensor
    log_prior: Tensor
    log_q: Tensor
    draws: dict[str, Tensor]
    value_sum: Tensor
    value_square_sum: Tensor
    exact_mean: Tensor
    kl_dim_sum: Tensor
    methods: dict[str, str]
    infer: dict[str, dict]
    mine: Tensor


def _draw(job: Job, space: LatentSpace) -> _Drawn:
    """The K draws of every row, seeded as :func:`ppl_vae.elbo` seeds them."""
    k, n, d = job.num_samples, len(job.x), _num_coordinates(space)
    new = dict(dtype=torch.float64, device=job.x.device)
    out = _Drawn(*(torch.zeros(k, n, **new) for _ in range(3)), draws={},
                 value_sum=torch.zeros(n, d, **new), value_square_sum=torch.zeros(n, d, **new),
                 exact_mean=torch.full((n, d), math.nan, **new),
                 kl_dim_sum=torch.zeros(n, d, **new), methods={}, infer={}, mine=job.mine())
    with caller_rng_kept(), torch.no_grad(), pyro.validation_enabled(False):
        for call in job.calls():
            with call.drawing():
                guide_trace, model_trace = _traces(job, call.x, call.idx, call.num_samples)
            _keep(out, space, guide_trace, model_trace, call.samples, call.positions,
                  call.real, k)
    for name in ("log_lik", "log_prior", "log_q"):
        setattr(out, name, gathered(getattr(out, name), out.mine, dim=1))
    for name in ("value_sum", "value_square_sum", "kl_dim_sum"):
        setattr(out, name, gathered(getattr(out, name), out.mine, dim=0))
    out.exact_mean = _gathered_nan(out.exact_mean, out.mine)
    return out


def _traces(job: Job, x: Tensor, idx: Tensor, size: int):
    """Guide and replayed model traces of ``size`` particles: the draws of estimators._unit."""
    with pyro.plate("particles", size, dim=-2):
        guide_trace = poutine.trace(job.guide).get_trace(x, idx, job.num_data)
        replayed = poutine.replay(job.model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(x, idx, job.num_data)
    return guide_trace, model_trace


def _keep(out: _Drawn, space, guide_trace, model_trace, samples: slice, positions, real, k):
    """Store one unit's densities, draws and per-coordinate terms at its rows."""
    rows = len(positions) if isinstance(real, slice) else len(real)  # a slice: all real
    shape = (samples.stop - samples.start, rows)
    for name, trace, observed in (("log_lik", model_trace, True),
                                  ("log_prior", model_trace, False),
                                  ("log_q", guide_trace, None)):  # its factors too
        values = log_density(trace, shape, observed=observed)[:, real]
        getattr(out, name)[samples, positions] = values.double()
    for name, site in _replayable(guide_trace):
        value = site["value"].expand(*shape, *site["value"].shape[2:])[:, real]
        if name not in out.draws:
            out.draws[name] = value.new_zeros(k, len(out.mine), *value.shape[2:])
        out.draws[name][samples, positions] = value
        out.infer[name] = dict(site["infer"])
    start = 0
    for site in space.sites:
        q_site, p_site = guide_trace.nodes[site.name], model_trace.nodes[site.name]
        value = _flat(p_site["value"], site, shape)[:, real].double()
        cols = slice(start, start + value.shape[-1])
        start = cols.stop
        out.value_sum[positions, cols] += value.sum(0)
        out.value_square_sum[positions, cols] += value.square().sum(0)
        mean = _exact_mean(q_site["fn"], site, shape)
        if mean is not None:
            out.exact_mean[positions, cols] = mean[real].double()
        kl, method = _kl_per_coordinate(q_site["fn"], p_site["fn"], p_site["value"])
        out.methods[site.name] = method
        out.kl_dim_sum[positions, cols] += _flat(kl, site, shape)[:, real].double().sum(0)


def _replayable(trace):
    """Sample sites whose values fix the guide's draw: all but subsample sites and point
    masses (a guide recomputes those from the auxiliary site that carries them)."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site) \
                and not site["is_observed"] and not is_point_mass(site["fn"]):
            yield name, site


def _flat(value: Tensor, site, shape) -> Tensor:
    """A site's per-coordinate tensor (S, B, *event) as (S, B, e)."""
    return value.expand(*shape, *site.event_shape).reshape(*shape, -1)


def _num_coordinates(space: LatentSpace) -> int:
    return sum(math.prod(site.event_shape) for site in space.sites)


def _exact_mean(fn, site, shape) -> Tensor | None:
    """E_q[u | x] of a site, shape (B, e), when the guide's distribution has a mean that
    no other draw moves (the same in every particle); else None (estimated from draws)."""
    if is_point_mass(fn):
        return None  # a point mass's "mean" is the draw itself
    try:
        mean = fn.mean
    except NotImplementedError:
        return None
    mean = _flat(mean, site, shape)
    if not torch.isfinite(mean).all() or not (mean == mean[:1]).all():
        return None
    return mean[0]


def _marginals(fn):
    """The per-coordinate univariate marginals of a site's distribution, or None.

    A MultivariateNormal's marginals are Normal; an Independent of univariate
    distributions is its base; anything else (a flow, a point mass) has none here.
    """
    if is_point_mass(fn):
        return None
    if isinstance(fn, MultivariateNormal):
        return Normal(fn.loc, fn.variance.sqrt())
    if isinstance(fn, Independent):
        return _marginals(fn.base_dist)
    return fn if fn.event_shape == torch.Size() else None


def _kl_per_coordinate(q_fn, p_fn, value: Tensor) -> tuple[Tensor, str]:
    """KL(q(u|x) || p(u)) per coordinate, shape (S, B, *event), and how it was had.

    Closed form for two Normals; one Monte Carlo term log q(u) - log p(u) at the draw
    for other univariate marginals; NaN when either density does not factorize. A
    prior that depends on other latents is taken at the draw's values of those.
    """
    q, p = _marginals(q_fn), _marginals(p_fn)
    if q is None or p is None:
        return torch.full_like(value, math.nan), "unavailable"
    if isinstance(q, Normal) and isinstance(p, Normal):
        return kl_divergence(q, p), "closed form"
    return q.log_prob(value) - p.log_prob(value), "monte carlo"


def _gathered_nan(values: Tensor, mine: Tensor) -> Tensor:
    """``gathered`` for a tensor whose missing entries are NaN (NaN + 0 stays NaN)."""
    known = ~values.isnan()
    merged = gathered(values.nan_to_num(), mine, dim=0)
    flags = gathered(known.double(), mine, dim=0)
    return merged.masked_fill(flags == 0, math.nan)


def _aggregate(job: Job, drawn: _Drawn, chunk_size: int):
    """log q(z_nk) of the aggregate posterior and log q(z_nk | x_n), both (K, N).

    Every draw of this process's rows is scored under the guide of every row, S draws
    against M rows per call with S M <= chunk_size, and the scores reduced by a running
    logsumexp over the rows (in float64).
    """
    k, n, mine = job.num_samples, len(job.x), drawn.mine
    own = mine.nonzero().squeeze(1).to(job.x.device)
    pairs_k = torch.arange(k, device=job.x.device).repeat_interleave(len(own))
    pairs_n = own.repeat(k)
    draws_per_call = max(1, min(DRAW_BLOCK, chunk_size, len(pairs_n)))  # 0 rows: none
    rows_per_call = max(1, chunk_size // draws_per_call)
    log_qbar = torch.zeros(k, n, dtype=torch.float64, device=job.x.device)
    own_score = torch.zeros_like(log_qbar)
    with caller_rng_kept(), torch.no_grad(), pyro.validation_enabled(False):
        for start in range(0, len(pairs_n), draws_per_call):
            ks, ns = pairs_k[start:start + draws_per_call], pairs_n[start:start + draws_per_call]
            values = {name: value[ks, ns] for name, value in drawn.draws.items()}
            running, diagonal = _score_all_rows(job, values, drawn.infer, ns, rows_per_call)
            log_qbar[ks, ns] = running - math.log(n)
            own_score[ks, ns] = diagonal
    return gathered(log_qbar, mine, dim=1), gathered(own_score, mine, dim=1)


def _score_all_rows(job: Job, values: dict[str, Tensor], infer: dict[str, dict], ns: Tensor,
                    rows_per_call: int):
    """logsumexp_m log q(z_s | x_m) over all rows m, and log q(z_s | x_{n_s}), shape (S,)."""
    size = len(ns)
    running = torch.full((size,), -math.inf, dtype=torch.float64, device=job.x.device)
    diagonal = torch.full_like(running, math.nan)
    for m0 in range(0, len(job.x), rows_per_call):
        m1 = min(m0 + rows_per_call, len(job.x))
        score = _score(job, values, infer, slice(m0, m1))
        running = torch.logaddexp(running, torch.logsumexp(score, 1))
        here = (ns >= m0) & (ns < m1)
        diagonal[here] = score[here, ns[here] - m0]
    return running, diagonal


def _score(job: Job, values: dict[str, Tensor], infer: dict[str, dict], rows: slice) -> Tensor:
    """log q(z_s | x_m) for draws s (S of them) and rows m, shape (S, M), by replay."""
    x, idx = job.x[rows], job.idx[rows]
    shape = (len(next(iter(values.values()))), len(x))
    trace = poutine.Trace()
    for name, value in values.items():
        # Expanded to (S, M, ...): a conditional network (a flow's) broadcasts its
        # context over the value's batch dims, not the other way round.
        # replay copies a site's infer dict (an auxiliary flag) into the guide's site.
        trace.add_node(name, type="sample", is_observed=False, infer=dict(infer[name]),
                       value=value.unsqueeze(1).expand(shape[0], shape[1], *value.shape[1:]))
    with pyro.plate("particles", shape[0], dim=-2):
        scored = poutine.trace(poutine.replay(job.guide, trace=trace)).get_trace(
            x, idx, job.num_data)
    return log_density(scored, shape).double()  # the guide's factors too, as log q


def _check_replay(own_score: Tensor, log_q: Tensor, mine: Tensor) -> None:
    """Warn when the guide does not give its own draws the density it drew them with
    (randomness outside its sample sites, such as dropout in training mode)."""
    finite = torch.isfinite(log_q)
    gap = (own_score - log_q).abs()[finite] / (1.0 + log_q.abs()[finite])
    if len(gap) and float(gap.max()) > REPLAY_TOLERANCE:
        warnings.warn(
            f"the guide scores its own draws up to {float(gap.max()):.2g} (relative) away "
            "from the log density it drew them with: it is not a function of x and its "
            "sample sites (dropout in training mode? call guide.eval()); the mutual "
            "information and marginal KL are unreliable",
            RuntimeWarning, stacklevel=3,
        )


def _report(job: Job, space, drawn: _Drawn, log_qbar, own_score, threshold) -> SurgeryReport:
    k = job.num_samples
    terms = {  # each (K, N)
        "elbo": drawn.log_lik + drawn.log_prior - drawn.log_q,
        "reconstruction": drawn.log_lik,
        "kl": drawn.log_q - drawn.log_prior,
        "mutual_information": own_score - log_qbar,
        "marginal_kl": log_qbar - drawn.log_prior,
    }
    per, means = {}, {}
    for name, values in terms.items():
        per[name] = values.mean(0)
        per[name + "_se"] = values.std(0) / math.sqrt(k) if k > 1 else \
            torch.full_like(per[name], math.nan)
        means[name] = float(per[name].mean())
        means[name + "_se"] = mean_se(per[name], per[name + "_se"])
    kl_dim = (drawn.kl_dim_sum / k).cpu()
    kl_dim[:, _unavailable(space, drawn.methods)] = math.nan
    activity = _activity(drawn, k)
    n = len(job.x)
    return SurgeryReport(
        **means,
        mutual_information_max=math.log(n),
        kl_per_dim=kl_dim.mean(0),
        kl_per_dim_se=kl_dim.std(0) / math.sqrt(n) if n > 1 else kl_dim[0] * math.nan,
        activity=activity,
        active_units=int((activity > threshold).sum()),
        num_latent_dims=kl_dim.shape[1],
        dim_names=_dim_names(space),
        kl_per_dim_method=dict(drawn.methods),
        threshold=threshold,
        num_samples=k,
        num_data=n,
        per_datapoint=per,
    )


def _unavailable(space, methods: dict[str, str]) -> Tensor:
    flags = [methods[site.name] == "unavailable" for site in space.sites
             for _ in range(math.prod(site.event_shape))]
    return torch.tensor(flags, dtype=torch.bool)


def _activity(drawn: _Drawn, k: int) -> Tensor:
    """Cov_x(E_q[u | x]) per coordinate, shape (d,).

    From the exact means where every row has one; else the variance over rows of the
    draws' means, less the part their own noise adds (the mean within-row variance
    over K), an unbiased estimate that needs K >= 2.
    """
    n = drawn.value_sum.shape[0]
    if n < 2:
        return torch.full((drawn.value_sum.shape[1],), math.nan, dtype=torch.float64)
    exact = ~drawn.exact_mean.isnan().any(0)
    from_exact = drawn.exact_mean.nan_to_num().var(0)
    means = drawn.value_sum / k
    if k > 1:
        within = (drawn.value_square_sum - k * means.square()) / (k - 1)
        from_draws = means.var(0) - within.mean(0) / k
    else:
        from_draws = torch.full_like(from_exact, math.nan)
    return torch.where(exact, from_exact, from_draws).cpu()


def _dim_names(space: LatentSpace) -> tuple[str, ...]:
    names = []
    for site in space.sites:
        count = math.prod(site.event_shape)
        names += [site.name] if not site.event_shape else \
            [f"{site.name}[{j}]" for j in range(count)]
    return tuple(names)
