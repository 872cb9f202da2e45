"""Per-datapoint log densities read from Pyro traces of the model and the guide.

Every number the engine computes (importance weights, ELBOs, AIS potentials) is a sum of
the ``log_prob`` of sites in a trace of the user's own model or guide: no density is
written twice. Two rules make those sums right for any model:

- a value outside its site's support scores -inf (validation is off in the hot paths,
  and e.g. Gamma.log_prob of a negative number is a finite, meaningless number);
- a site's log-density is taken unscaled and per datapoint, shape (particles, rows).
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import constraints

from ppl_vae.guides.latent_space import LatentSpace, base_support

# Supports that hold every real value: no check needed.
_ALL_REALS = (constraints.real, constraints.real_vector)


def log_density(trace, shape: tuple[int, int], observed: bool | None = None) -> Tensor:
    """Sum of unscaled site log-densities of a trace, shape ``shape`` = (K, B).

    ``observed`` picks the sites: True the observed ones, False the latent ones, None
    all. Values outside a site's support score -inf.
    """
    total, outside = None, None
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if observed is not None and site["is_observed"] != observed:
            continue
        log_prob = _site_log_prob(site)
        total = log_prob if total is None else total + log_prob
        if not site["is_observed"]:
            inside = _inside_support(site["fn"], site["value"])
            if inside is not None:
                outside = ~inside if outside is None else outside | ~inside
    if total is None:
        return torch.zeros(shape, device=_trace_device(trace))
    total = total.expand(shape)
    # After the sum: a likelihood evaluated at an impossible latent may be NaN.
    return total if outside is None else total.masked_fill(outside.expand(shape), -torch.inf)


def _site_log_prob(site) -> Tensor:
    log_prob = site["fn"].log_prob(site["value"])
    if site["mask"] is not None:
        log_prob = log_prob.masked_fill(~site["mask"], 0.0)
    return log_prob


def _inside_support(fn, value: Tensor) -> Tensor | None:
    """Where ``value`` lies in the support, or None for a support of all reals."""
    if base_support(fn.support) in _ALL_REALS:
        return None
    return fn.support.check(value)


def log_joint(model, space: LatentSpace, x: Tensor, idx: Tensor, num_data: int,
              u: Tensor) -> tuple[Tensor, Tensor]:
    """The model's density at unconstrained latents ``u`` of shape (C, B, d).

    Returns
    -------
    log_prior : Tensor of shape (C, B)
        log p(z(u)) + log |det dz/du|: the prior's density in the unconstrained space.
    log_likelihood : Tensor of shape (C, B)
        log p(x | z(u)), the observed sites.
    """
    values, log_det = space.unflatten(u)
    shape = tuple(u.shape[:2])
    with pyro.plate("particles", shape[0], dim=-2):
        conditioned = poutine.condition(model, data=values)
        trace = poutine.trace(conditioned).get_trace(x, idx, num_data)
    latent_names = set(values)
    log_prior = log_det + _sum_sites(trace, shape, latent_names, True)
    return log_prior, _sum_sites(trace, shape, latent_names, False)


def _sum_sites(trace, shape, names: set[str], latent: bool) -> Tensor:
    total = None
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if (name in names) != latent:
            continue
        log_prob = _site_log_prob(site)
        total = log_prob if total is None else total + log_prob
    if total is None:
        return torch.zeros(shape, device=_trace_device(trace))
    return total.expand(shape)


def refuse_nan(values: Tensor, traces: dict, shape: tuple[int, int], idx: Tensor) -> None:
    """Raise a ValueError naming the sites and rows where a log-density is NaN.

    ``values`` of shape ``shape`` (K, B) came from ``traces`` (role -> trace) of the
    rows with dataset indices ``idx``. A NaN density is a bug in the model or guide (a
    scale of 0, a log of a negative number), not a weight of zero: an estimate must
    never average it in, nor quietly drop it.
    """
    total = float(values.sum())
    # A NaN makes the sum NaN: a sum that is a number (one pass) clears the values. A
    # NaN sum may also come of +inf and -inf, so the values are then looked at one by one.
    if total == total or not bool(torch.isnan(values).any()):
        return
    found = nan_sites(traces, shape, idx)
    rows = idx[torch.isnan(values).any(0).to(idx.device)].tolist()
    where = "; ".join(found) if found else f"the log weights of rows {rows[:8]}"
    raise ValueError(
        f"the log-density is NaN at {where}: a NaN density is a bug in the model or guide "
        "(a scale of 0, the log of a negative number, an overflow), not a weight of zero, "
        "so no estimate is returned; fix the site's distribution for those rows"
    )


def nan_sites(traces: dict, shape: tuple[int, int], idx: Tensor) -> list[str]:
    """"<role> site 'name' (rows [...])" for every site whose log-density is NaN where
    the latents lie in their supports (outside them a likelihood may be NaN: such draws
    score -inf)."""
    found = []
    for role, trace in traces.items():
        outside = _outside(trace, shape)
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            bad = _site_log_prob(site).expand(shape).isnan() & ~outside
            columns = bad.any(0)
            if bool(columns.any()):
                rows = idx[columns.to(idx.device)].tolist()
                found.append(f"{role} site {name!r} (datapoints {rows[:8]})")
    return found


def _outside(trace, shape) -> Tensor:
    outside = torch.zeros(shape, dtype=torch.bool, device=_trace_device(trace))
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
            continue
        inside = _inside_support(site["fn"], site["value"])
        if inside is not None:
            outside = outside | ~inside.expand(shape)
    return outside


def _trace_device(trace) -> torch.device:
    """Where a trace's sample values live (the CPU for a trace with none)."""
    for site in trace.nodes.values():
        if site["type"] == "sample" and isinstance(site["value"], Tensor):
            return site["value"].device
    return torch.device("cpu")


def refuse_nan_in_trace(model, guide, x: Tensor, idx: Tensor, num_data: int,
                        particles: int = 16) -> None:
    """Draw ``particles`` samples of the guide on ``x`` and raise a ValueError naming
    any model or guide site whose log-density is NaN (a loss that became NaN is then a
    bug in the model, not a learning rate too large). A guide that cannot be run so
    returns quietly, and the caller's FloatingPointError stands."""
    shape = (particles, len(x))
    try:
        with torch.no_grad(), pyro.validation_enabled(False), \
                pyro.plate("particles", particles, dim=-2):
            guide_trace = poutine.trace(guide).get_trace(x, idx, num_data)
            replayed = poutine.replay(model, trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(x, idx, num_data)
    # A diagnosis that cannot run (a guide fed fixed noise of its own particle count,
    # say) must not hide the caller's error.
    except Exception:  # noqa: BLE001
        return
    found = nan_sites({"model": model_trace, "guide": guide_trace}, shape, idx)
    if found:
        raise ValueError(
            f"the loss became NaN, and the log-density is NaN at {'; '.join(found)}: a bug "
            "in the model or guide (a scale of 0, the log of a negative number), not a "
            "learning rate too large; fix the site's distribution for those rows"
        )
