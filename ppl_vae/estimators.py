"""Per-datapoint importance sampling: log weights, log p(x), the ELBO, and diagnostics.

Every estimator starts from one matrix of log weights [K, N],

    log w[k, n] = log p(x_n, z_kn) - log q(z_kn | x_n),    z_kn ~ q(. | x_n),

and reduces over the K samples of each datapoint last. (Pyro's ``Importance`` and
``vectorized_importance_weights`` weight a whole batch jointly, which answers a different
question.) The model and guide are reused as they are: no density is written twice.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass

import pyro
import pyro.distributions as dist
import pyro.util
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppl_vae.validation import as_data, one_of, positive_int

PROPOSALS = ("guide", "prior")

# Elements of one [samples, rows, D] temporary per chunk: 2**20 floats is 4 MB, so the
# handful of such temporaries a decoder keeps alive stay far below 1 GB whatever K is,
# and mostly in cache. Measured on the MNIST VAE (K=1000, 100 points, one thread):
# 2**18 -> 1.66 s, 2**20 -> 1.28 s, 2**22 -> 1.91 s; all K at once by hand: 2.63 s.
CHUNK_ELEMENTS = 2**20


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
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Importance log weights log p(x, z) - log q(z | x), one column per datapoint.

    Parameters
    ----------
    model, guide : PyroModule
        Following the ``forward(x, idx=None, num_data=None)`` convention; every latent
        site must live in the ``"data"`` plate.
    x : Tensor or ndarray of shape (N, D)
    num_samples : int
        K, samples per datapoint.
    proposal : {"guide", "prior"}
        ``"prior"`` draws z from the model's prior (naive Monte Carlo): the weights are
        then the likelihoods p(x | z).
    idx, num_data : optional
        Row indices of ``x`` in the dataset a local guide was built for, and its size.
    seed : int, optional
        Seeds the draws.
    chunk_elements : int
        Bound on samples x rows x D per chunk, which bounds peak memory.

    Returns
    -------
    Tensor of shape (K, N)
    """
    x = as_data(x, model)
    num_samples = positive_int(num_samples, "num_samples")
    one_of(proposal, PROPOSALS, "proposal")
    idx = torch.arange(len(x), device=x.device) if idx is None else idx
    num_data = num_data or len(x)
    with _caller_rng_kept(seed is not None):
        check_structure(model, x[:1], idx[:1], num_data)
        if proposal == "guide":
            _refuse_point_masses(guide, x[:1], idx[:1], num_data)
        if seed is not None:  # after the checks, so they do not shift the draws
            pyro.set_rng_seed(seed)
        with torch.no_grad(), pyro.validation_enabled(False):
            return _chunked(model, guide, x, idx, num_data, num_samples, proposal, chunk_elements)


def log_marginal(model, guide, x, num_samples: int = 1000, **kwargs) -> Tensor:
    """Importance-sampled log p(x) per datapoint, Tensor of shape (N,).

    log p(x_n) ~= logsumexp_k log w[k, n] - log K; a lower bound in expectation that
    tightens as K grows. Keywords as for :func:`log_weights`.
    """
    lw = log_weights(model, guide, x, num_samples, **kwargs)
    return torch.logsumexp(lw, 0) - math.log(lw.shape[0])


def elbo(model, guide, x, num_samples: int = 100, **kwargs) -> Tensor:
    """Monte Carlo ELBO per datapoint, E_q[log w], Tensor of shape (N,)."""
    return log_weights(model, guide, x, num_samples, **kwargs).mean(0)


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
                out[name + "_se"] = _mean_se(values, getattr(self, name + "_se", None))
        out["khat_above_0.7"] = float((self.khat > 0.7).double().mean())
        return out


def diagnostics(model, guide, x, num_samples: int = 1000, **kwargs) -> Diagnostics:
    """log p(x), ELBO, standard errors, ESS and PSIS k-hat per datapoint.

    Keywords as for :func:`log_weights`.
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


def pareto_khat(lw: Tensor) -> Tensor:
    """PSIS k-hat per datapoint (``arviz.psislw``, samples on the last axis)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz

        _, khat = arviz.psislw(lw.T.double().cpu().numpy().copy(), reff=1.0)
    return torch.as_tensor(khat, dtype=lw.dtype).reshape(lw.shape[1])


def _std(values: Tensor) -> Tensor:
    if values.shape[0] < 2:
        return torch.full_like(values[0], float("nan"))
    return values.std(0)


def _mean_se(values: Tensor, per_point_se: Tensor | None) -> float:
    """Standard error of a mean over datapoints: their spread plus the Monte Carlo noise."""
    n = len(values)
    spread = float(values.var()) / n if n > 1 else 0.0
    noise = 0.0
    if per_point_se is not None:
        noise = float(per_point_se.nan_to_num().square().sum()) / n**2
    return math.sqrt(spread + noise)


def _chunked(model, guide, x, idx, num_data, num_samples, proposal, chunk_elements) -> Tensor:
    """Fill [K, N] chunk by chunk: many samples for few rows, so the guide runs rarely."""
    sample_chunk = max(1, min(num_samples, chunk_elements // x.shape[1]))
    row_chunk = max(1, chunk_elements // (sample_chunk * x.shape[1]))
    out = x.new_empty(num_samples, len(x))
    for r in range(0, len(x), row_chunk):
        rows = slice(r, r + row_chunk)
        for s in range(0, num_samples, sample_chunk):
            k = min(sample_chunk, num_samples - s)
            out[s : s + k, rows] = _chunk(model, guide, x[rows], idx[rows], num_data, k, proposal)
    return out


def _chunk(model, guide, x, idx, num_data, k, proposal) -> Tensor:
    shape = (k, len(x))
    with pyro.plate("particles", k, dim=-2):
        if proposal == "prior":
            model_trace = poutine.trace(model).get_trace(x, idx, num_data)
            return _log_density(model_trace, shape, observed=True)
        guide_trace = poutine.trace(guide).get_trace(x, idx, num_data)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(x, idx, num_data)
    log_joint = _log_density(model_trace, shape, observed=None)
    return log_joint - _log_density(guide_trace, shape, observed=False)


def _log_density(trace, shape, observed: bool | None) -> Tensor:
    """Sum of unscaled site log-densities, shape [K, B]; ``observed`` picks the sites."""
    total = torch.zeros(shape)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if observed is not None and site["is_observed"] != observed:
            continue
        log_prob = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            log_prob = log_prob.masked_fill(~site["mask"], 0.0)
        total = total.to(log_prob) + log_prob
    return total.expand(shape)


def check_structure(model, x: Tensor, idx: Tensor | None = None, num_data=None) -> None:
    """Check, on one cheap trace, what per-datapoint estimates need of a model.

    Every latent site must live in the ``"data"`` plate (a global latent couples the
    datapoints, so log p(x_n) no longer splits per datapoint), and an observed site must
    declare a datapoint's dims as event dims (``.to_event(1)``), or its log-density is
    not one number per datapoint.
    """
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            trace = poutine.trace(model).get_trace(x, idx, num_data)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"the model fails on a single datapoint ({error}); check that every "
            "per-datapoint site is inside the 'data' plate and declares its event dims "
            "with .to_event(1)"
        ) from error
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if not site["is_observed"] and "data" not in {f.name for f in site["cond_indep_stack"]}:
            raise ValueError(
                f"latent site {name!r} is outside the 'data' plate: per-datapoint "
                "estimators need every latent variable to be local to a datapoint"
            )
        event_shape = tuple(site["fn"].event_shape)
        if site["is_observed"] and event_shape != tuple(site["value"].shape[1:]):
            raise ValueError(
                f"observed site {name!r} has event shape {event_shape} but each datapoint "
                f"has shape {tuple(site['value'].shape[1:])}: the data must have the "
                "model's width, and the model must declare a datapoint's dims as event "
                "dims, e.g. dist.Bernoulli(logits=...).to_event(1)"
            )


def check_guide_covers(model, guide, x: Tensor, idx: Tensor, num_data: int) -> None:
    """Refuse a guide that lacks a site for one of the model's latent variables.

    Such a variable would be redrawn from its prior at every SVI step, and never fitted.
    Sites marked for enumeration are left to the guide-less route they are meant for.
    """
    with torch.no_grad(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(x, idx, num_data)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(x, idx, num_data)
    missing = [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("enumerate")
        and name not in guide_trace.nodes
    ]
    if missing:
        raise ValueError(
            f"the model's latent sites {missing} have no site in the guide "
            f"({type(guide).__name__}): SVI would redraw them from the prior at every "
            "step; give the guide a site of the same name for each"
        )


def _refuse_point_masses(guide, x, idx, num_data) -> None:
    with torch.no_grad(), pyro.validation_enabled(False):
        trace = poutine.trace(guide).get_trace(x, idx, num_data)
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site) and _is_delta(site["fn"]):
            raise ValueError(
                f"guide site {name!r} is a point mass (Delta): it has no density to "
                "weight by, so it cannot be an importance-sampling proposal; use an "
                "encoder with a density or proposal='prior'"
            )


def _is_delta(fn) -> bool:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


@contextlib.contextmanager
def _caller_rng_kept(keep: bool):
    """Leave the caller's random state as it was (a seeded call must not reseed it)."""
    if not keep:
        yield
        return
    state = pyro.util.get_rng_state()
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)
