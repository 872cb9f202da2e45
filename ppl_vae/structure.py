"""What per-datapoint estimation needs of a model and a guide, checked on one cheap trace.

The checks run once, at the public boundary (after :mod:`ppl_vae.programs` has put the
user's model and guide into the engine's form), so the engine below trusts its inputs.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import constraints

from ppl_vae.guides.latent_space import (
    LatentSpace,
    base_support,
    fails_on_one_row,
    is_latent_site,
    is_periodic,
    leaf_distribution,
    periodic_latent_message,
    refuse_periodic_latents,
    refuse_supports_varying_by_row,
)
from ppl_vae.row_coupling import refuse_coupled_rows
from ppl_vae.row_weights import refuse_row_weights
from ppl_vae.validation import positive_int


def check_rows(x: Tensor, idx, num_data) -> tuple[Tensor, int]:
    """``idx`` (default: 0..N-1) as a LongTensor of length N, and ``num_data``."""
    if idx is None:
        idx = torch.arange(len(x), device=x.device)
    else:
        idx = torch.as_tensor(idx, device=x.device)
        if idx.dtype not in (torch.int64, torch.int32) or idx.shape != (len(x),):
            raise ValueError(
                f"idx must hold one integer row index per row of x ({len(x)}), got "
                f"dtype {idx.dtype} and shape {tuple(idx.shape)}"
            )
        idx = idx.long()
        if len(idx) and int(idx.min()) < 0:
            raise ValueError(f"idx must be non-negative, got {int(idx.min())}")
    if num_data is None:
        num_data = max(len(x), int(idx.max()) + 1)
    num_data = positive_int(num_data, "num_data")
    if int(idx.max()) >= num_data:
        raise ValueError(f"idx holds row {int(idx.max())} but num_data is {num_data}")
    return idx, num_data


def check_structure(model, x: Tensor, idx: Tensor | None = None, num_data=None, *,
                    data_dtype: bool = False, unconstrained: bool = False) -> LatentSpace:
    """Check, on one cheap trace, what per-datapoint estimates need of a model.

    Every latent site must live in the ``"data"`` plate (a global latent couples the
    datapoints, so log p(x_n) no longer splits per datapoint), declare its event dims,
    and be continuous; an observed site must declare a datapoint's dims as event dims
    (``.to_event(1)``), or its log-density is not one number per datapoint.

    With ``data_dtype`` (for work that draws latents from the model's prior and holds
    them in the data's dtype: AIS, local fits), the model's latents must also be drawn
    in the dtype of x. With ``unconstrained`` (work that moves the latents in their
    unconstrained space, through one transform per site for every row: AIS, local fits),
    every latent must be one that space holds: not marked auxiliary, not a point mass,
    not periodic (``VonMises``), and with a support the same on every row.

    Returns
    -------
    LatentSpace
        The model's latent sites.
    """
    # One trace serves both checks: x goes to no helper, and the model runs once.
    first = None if idx is None else idx[:1]
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            trace = poutine.trace(model).get_trace(x[:1], first, num_data)
    except (ValueError, RuntimeError) as error:
        raise ValueError(fails_on_one_row(model, error)) from error
    space = LatentSpace.of_trace(model, trace)
    _refuse_observed_shapes(trace)
    refuse_row_weights(model, trace, x, idx, num_data)
    if data_dtype:
        _refuse_other_dtypes(trace, x.dtype)
    if unconstrained:
        _refuse_latents_outside_the_space(trace)
        refuse_periodic_latents(trace, "AIS or a local fit (in the unconstrained space)")
        refuse_supports_varying_by_row(model, space, x, idx, num_data)
    refuse_coupled_rows(model, "model", x, idx, num_data or len(x))
    return space


def check_observed(model, x: Tensor, idx: Tensor | None = None, num_data=None) -> None:
    """Refuse an observed site whose event shape is not one datapoint's shape."""
    first = None if idx is None else idx[:1]
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            trace = poutine.trace(model).get_trace(x[:1], first, num_data)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"{described(model)} fails on a single datapoint ({error}); every dim of one "
            "datapoint must be an event dim: declare them with .to_event(n), e.g. "
            "dist.Bernoulli(logits=...).to_event(1)"
        ) from error
    _refuse_observed_shapes(trace)


def _refuse_other_dtypes(trace, dtype: torch.dtype) -> None:
    for name, site in trace.nodes.items():
        if is_latent_site(site) and site["value"].dtype != dtype:
            raise ValueError(
                f"the model draws its latent site {name!r} in {site['value'].dtype} but x is "
                f"{dtype}: give the data the model's dtype (x.float() or x.double()), or "
                "build the model's constants in the data's dtype"
            )


def _refuse_latents_outside_the_space(trace) -> None:
    """Refuse model latents that AIS and the local fits cannot move: one marked auxiliary
    (the latent space leaves it out, so it would be redrawn from its prior at every
    density while scored as data) and a point mass (no density to move on: AIS accepts
    no move, a local fit's loss is infinite)."""
    for name, site in trace.nodes.items():
        if not is_latent_site(site):
            continue
        if site["infer"].get("is_auxiliary"):
            raise ValueError(
                f"the model marks its latent site {name!r} infer={{'is_auxiliary': True}}: "
                "the mark is for a guide's draws that the model lacks; in a model every "
                "sample site is part of the joint, and AIS and the local fits would leave "
                "it out of the latents (redrawn from its prior, yet scored); remove the mark"
            )
        if is_point_mass(site["fn"]):
            raise ValueError(
                f"the model draws its latent site {name!r} from a point mass (Delta): there "
                "is no density for AIS or a local fit to move on; record a function of the "
                "other latents with pyro.deterministic, or give it a distribution with a "
                "density"
            )


def _refuse_observed_shapes(trace) -> None:
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or site_is_subsample(site):
            continue
        event_shape = tuple(site["fn"].event_shape)
        if event_shape != tuple(site["value"].shape[1:]):
            raise ValueError(
                f"observed site {name!r} has event shape {event_shape} but each datapoint "
                f"has shape {tuple(site['value'].shape[1:])}: the data must have the "
                "model's width, and the model must declare a datapoint's dims as event "
                "dims, e.g. dist.Bernoulli(logits=...).to_event(1)"
            )


def check_guide(model, guide, x: Tensor, idx: Tensor, num_data: int):
    """Refuse a guide that cannot serve as an importance proposal for ``model``.

    It must have a site for each of the model's latents, no latent site the model does
    not have (unless marked ``infer={"is_auxiliary": True}``), and no point mass.

    Returns
    -------
    The guide's trace on the first row, for callers that read more of it.
    """
    trace = check_guide_covers(model, guide, x[:1], idx[:1], num_data)
    _refuse_point_masses(trace)
    refuse_latents_drawn_given_auxiliaries(trace)
    _refuse_nan_density(guide, trace)
    refuse_coupled_rows(guide, "guide", x, idx, num_data)
    return trace


def check_guide_covers(model, guide, x: Tensor, idx: Tensor, num_data: int):
    """Refuse a guide whose sites do not match the model's latents one to one (and
    return the guide's trace on ``x``).

    A model latent with no guide site would be redrawn from its prior (by SVI at every
    step, by the estimators in every sample) while its density stays in the joint; a
    guide site that is no latent of the model adds a log q term with no log p term.
    Sites marked for enumeration are left to the guide-less route they are meant for.
    """
    with torch.no_grad(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(x, idx, num_data)
        replayed = poutine.replay(model, trace=guide_trace)
        try:
            model_trace = poutine.trace(replayed).get_trace(x, idx, num_data)
        except (RuntimeError, TypeError) as error:
            # Say so at the boundary, not from deep inside torch at the first step: the
            # model runs on its prior draws but not on the guide's (often a dtype, as
            # float64 data and draws against the model's float32 constants).
            dtypes = sorted({str(site["value"].dtype) for site in guide_trace.nodes.values()
                             if is_latent_site(site)})
            raise ValueError(
                f"the model ({described(model)}) fails on the guide's draws (dtypes "
                f"{dtypes}, data {x.dtype}): {type(error).__name__}: {error}"
            ) from error
    latents = {name for name, site in model_trace.nodes.items() if is_latent_site(site)}
    missing = [
        name for name in latents
        if name not in guide_trace.nodes and not model_trace.nodes[name]["infer"].get("enumerate")
    ]
    if missing:
        raise ValueError(
            f"the model's latent sites {sorted(missing)} have no site in the guide "
            f"({described(guide)}): they would be drawn from the prior while their "
            "density stays in the joint; give the guide a site of the same name for each"
            + _obs_mask_hint(missing)
        )
    extra = [
        name for name, site in guide_trace.nodes.items()
        if is_latent_site(site) and not site["infer"].get("is_auxiliary") and name not in latents
    ]
    if extra:
        raise ValueError(
            f"the guide ({described(guide)}) has sample sites {sorted(extra)} that are "
            "not latent sites of the model: their log q would count with no log p; rename "
            "them to the model's sites or mark them infer={'is_auxiliary': True}"
        )
    for name in sorted(latents):
        fn = model_trace.nodes[name]["fn"]
        drawn_by = guide_trace.nodes[name]["fn"] if name in guide_trace.nodes else None
        if is_periodic(fn) and drawn_by is not None and not is_periodic(drawn_by):
            raise ValueError(periodic_latent_message(
                name, fn, f"the guide ({described(guide)}, {type(drawn_by).__name__})"))
    return guide_trace


def _obs_mask_hint(missing) -> str:
    # pyro.sample(..., obs_mask=m) samples the masked values as a latent "<name>_unobserved".
    masked = sorted(name for name in missing if name.endswith("_unobserved"))
    if not masked:
        return ""
    return (f". {masked} come of obs_mask=, which makes Pyro draw the masked values as "
            "latents; to leave missing values out of the likelihood, mask the distribution "
            "instead: dist.Normal(loc, scale).mask(observed).to_event(1)")


def check_supports(model, guide, x: Tensor, idx: Tensor, num_data: int) -> None:
    """Refuse, before training, a guide site over all reals for a constrained latent.

    Its draws fall outside the latent's support, where the model's log-density is
    meaningless (NaN or a finite number of nothing), so SVI gradients are garbage. (The
    estimators instead score such draws -inf, which is right for importance sampling.)
    """
    with torch.no_grad(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(x[:1], idx[:1], num_data)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(x[:1], idx[:1], num_data)
    for name, site in model_trace.nodes.items():
        if not is_latent_site(site) or name not in guide_trace.nodes:
            continue
        drawn_by = guide_trace.nodes[name]["fn"]
        if is_point_mass(drawn_by):  # its value comes from an auxiliary draw, transformed
            continue
        if _all_reals(drawn_by.support) and not _all_reals(site["fn"].support):
            raise ValueError(
                f"guide site {name!r} draws from {type(drawn_by).__name__} over all reals, "
                f"but the model's latent {name!r} has support {site['fn'].support}: SVI "
                "would score draws outside it; give the guide a distribution on that "
                "support (LogNormal, Gamma, or a TransformedDistribution through "
                "torch.distributions.biject_to(support))"
            )


def _all_reals(support) -> bool:
    return base_support(support) is constraints.real


def check_conditionable(guide, x: Tensor, idx: Tensor, num_data: int) -> None:
    """Refuse a proposal whose log q(z) cannot be read by conditioning it on z.

    AIS needs log q at any z. A guide without ``joint_distribution`` is conditioned on
    the latents' values; a guide that draws them through auxiliary sites would then
    redraw those sites, and its log q would be that of a fresh draw, not of z.
    """
    if callable(getattr(guide, "joint_distribution", None)):
        return
    with torch.no_grad(), pyro.validation_enabled(False):
        trace = poutine.trace(guide).get_trace(x[:1], idx[:1], num_data)
    auxiliary = [name for name, site in trace.nodes.items()
                 if is_latent_site(site) and site["infer"].get("is_auxiliary")]
    if auxiliary:
        raise ValueError(
            f"the proposal ({described(guide)}) draws its latents through auxiliary "
            f"sites {auxiliary}: AIS needs log q(z) at any z, which conditioning such a "
            "guide on z does not give; use a guide that samples its latent sites directly, "
            "a local guide of ppl_vae.fit_local, or proposal=None (the prior)"
        )


def _refuse_nan_density(guide, trace) -> None:
    """A guide site whose density is NaN at its own draw (a scale of 0, say)."""
    for name, site in trace.nodes.items():
        if is_latent_site(site) and bool(site["fn"].log_prob(site["value"]).isnan().any()):
            raise ValueError(
                f"guide site {name!r} of {described(guide)} has a NaN log-density at its "
                f"own draw on the first datapoint ({type(site['fn']).__name__}; a scale of "
                "0?): it cannot weight importance samples"
            )


def described(program) -> str:
    """A model's or guide's name for messages: the user's own for a wrapped program."""
    return getattr(program, "program_name", type(program).__name__)


def refuse_latents_drawn_given_auxiliaries(trace) -> None:
    """Refuse a hierarchical guide: latents drawn at random given auxiliary draws.

    With auxiliary sites, q(z) is the marginal over them. The trace's joint density
    q(aux) q(z | aux) gives it only where every latent is a point mass given them (Pyro's
    autoguides hand each latent its piece of one vector so). Otherwise log q(aux, z) =
    log q(z) + log q(aux | z), and without a reverse model r(aux | z) every quantity built
    on it is off by the entropy of q(aux | z): importance weights, log p(x) and the ELBO
    read too high, and SVI maximizes that entropy (an ELBO above log p(x))."""
    auxiliary = sorted(name for name, site in trace.nodes.items()
                       if site["type"] == "sample" and site["infer"].get("is_auxiliary"))
    drawn = sorted(name for name, site in trace.nodes.items()
                   if is_latent_site(site) and not site["infer"].get("is_auxiliary")
                   and not is_point_mass(site["fn"]))
    if auxiliary and drawn:
        raise ValueError(
            f"the guide draws its latent sites {drawn} at random alongside the auxiliary sites "
            f"{auxiliary}: q of the latents is then the marginal over the auxiliary draws, "
            "which the guide's joint density does not give, so the ELBO (and SVI's objective), "
            "importance weights and log p(x) would all be biased upwards; draw the latents "
            "directly, or make each a point mass (dist.Delta) of the auxiliary draws with its "
            "log-Jacobian (Delta's log_density or pyro.factor)"
        )


def _refuse_point_masses(trace) -> None:
    """A Delta site is a point mass unless an auxiliary site carries its randomness (as
    in guides that sample one joint vector and hand each latent its piece)."""
    if any(site["type"] == "sample" and site["infer"].get("is_auxiliary")
           for site in trace.nodes.values()):
        return
    for name, site in trace.nodes.items():
        if is_latent_site(site) and is_point_mass(site["fn"]):
            raise ValueError(
                f"guide site {name!r} is a point mass (Delta): it has no density to "
                "weight by, so it cannot be an importance-sampling proposal; use an "
                "encoder with a density or proposal='prior'"
            )


def is_point_mass(fn) -> bool:
    return isinstance(leaf_distribution(fn), dist.Delta)

