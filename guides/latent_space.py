"""A model's latent variables as one flat, unconstrained vector per datapoint.

Local guides, AIS and HMC all work on the same object: every latent sample site of the
model inside the ``"data"`` plate, whatever its name, event shape or support, mapped to
R^d by ``biject_to(site.support)`` and concatenated in the order the model samples them.
A vector ``u`` of shape (..., d) then stands for one value of every latent:

    values, log_det = space.unflatten(u)      # constrained values, log |d values / d u|

so a density q(u) over R^d is the density q(z) of the constrained latents times the
Jacobian, and a model's log p(x, z(u)) + log_det is its density in the unconstrained
space. Nothing here evaluates a model's density; that stays with the model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cached_property

import pyro
import torch
from pyro import poutine
from pyro.distributions import SineBivariateVonMises, SineSkewed
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import VonMises, biject_to, constraints
from torch.distributions.transforms import Transform

DATA_PLATE = "data"


@dataclass(frozen=True)
class LatentSite:
    """One latent sample site: its name, event shape and support.

    ``unconstrained_shape`` is the event shape of its unconstrained value (it differs
    from ``event_shape`` for supports such as the simplex).
    """

    name: str
    event_shape: torch.Size
    support: constraints.Constraint

    @cached_property
    def transform(self) -> Transform:
        """``biject_to(support)``: unconstrained value -> value in the support."""
        return biject_to(self.support)

    @cached_property
    def unconstrained_shape(self) -> torch.Size:
        """Event shape of the unconstrained value."""
        return torch.Size(self.transform.inverse_shape(self.event_shape))

    @property
    def size(self) -> int:
        """Number of unconstrained coordinates of the site."""
        return math.prod(self.unconstrained_shape)

    @property
    def is_real(self) -> bool:
        """True when the support is all of R^n (the transform is the identity)."""
        return base_support(self.support) is constraints.real


@dataclass(frozen=True)
class LatentSpace:
    """The latent sites of a model and the map between them and one vector in R^d.

    Build it with :meth:`of`. ``dim`` is d, the total size of the unconstrained latents.
    """

    sites: tuple[LatentSite, ...]

    @property
    def dim(self) -> int:
        """d, the total size of the unconstrained latents."""
        return sum(site.size for site in self.sites)

    @property
    def names(self) -> tuple[str, ...]:
        """The latent sites' names, in the model's order."""
        return tuple(site.name for site in self.sites)

    @classmethod
    def of(cls, model, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        """The latent space of ``model``, read from one trace on the first row of ``x``.

        Raises
        ------
        ValueError
            When a latent site is outside the ``"data"`` plate, has batch dims other
            than that plate's (an event dim not declared with ``.to_event``), has a
            discrete or periodic (``VonMises``) support, or a support that differs
            between the rows of ``x``
            (:func:`~ppl_vae.guides.latent_space.refuse_supports_varying_by_row`); or
            when the model has no latent site at all.
        """
        first = None if idx is None else idx[:1]
        try:
            with torch.no_grad(), pyro.validation_enabled(False):
                trace = poutine.trace(model).get_trace(x[:1], first, num_data)
        except (ValueError, RuntimeError) as error:
            raise ValueError(fails_on_one_row(model, error)) from error
        space = cls.of_trace(model, trace)
        refuse_periodic_latents(trace, "a guide over the unconstrained latents")
        refuse_supports_varying_by_row(model, space, x, idx, num_data)
        return space

    @classmethod
    def of_trace(cls, model, trace):
        """The latent space read from a trace of ``model`` on one datapoint (see :meth:`of`)."""
        sites = tuple(_latent_site(name, site) for name, site in _latent_nodes(trace))
        if not sites:
            raise ValueError(
                f"{_described(model)} has no latent sample site: there is nothing to "
                "infer"
            )
        return cls(sites)

    def unflatten(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Constrained values of every site from ``u`` of shape (..., d).

        Returns
        -------
        values : dict of str to Tensor of shape (..., *event_shape)
        log_det : Tensor of shape (...)
            ``log |det d values / d u|``, summed over the sites.
        """
        batch = u.shape[:-1]
        values, log_det, start = {}, u.new_zeros(batch), 0
        for site in self.sites:
            piece = u[..., start : start + site.size].reshape(*batch, *site.unconstrained_shape)
            start += site.size
            if site.is_real:
                values[site.name] = piece
                continue
            value = site.transform(piece)
            values[site.name] = value
            log_det = log_det + _sum_to(site.transform.log_abs_det_jacobian(piece, value), batch)
        return values, log_det

    def flatten(self, values: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten`: ``u`` of shape (..., d) from constrained values."""
        pieces = []
        for site in self.sites:
            value = values[site.name]
            batch = value.shape[: value.dim() - len(site.event_shape)]
            piece = value if site.is_real else site.transform.inv(value)
            pieces.append(piece.reshape(*batch, site.size))
        return torch.cat(pieces, -1)

    def log_det(self, u: Tensor) -> Tensor:
        """``log |det d values / d u|`` of ``u`` of shape (..., d), shape (...)."""
        return self.unflatten(u)[1]

    def unflatten_sites(self, u: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Like :meth:`unflatten`, with each site's log-Jacobian kept apart.

        A guide that samples ``u`` and hands each site its value as a ``Delta`` gives
        each site its own ``log_density`` from these.

        Returns
        -------
        values : dict of str to Tensor of shape (..., *event_shape)
        log_dets : dict of str to Tensor of shape (...)
            ``log |det d value / d piece|`` of each site (zeros for real sites).
        """
        batch = u.shape[:-1]
        values, log_dets, start = {}, {}, 0
        for site in self.sites:
            piece = u[..., start : start + site.size].reshape(*batch, *site.unconstrained_shape)
            start += site.size
            if site.is_real:
                values[site.name], log_dets[site.name] = piece, u.new_zeros(batch)
                continue
            value = site.transform(piece)
            values[site.name] = value
            log_dets[site.name] = _sum_to(site.transform.log_abs_det_jacobian(piece, value), batch)
        return values, log_dets


def fails_on_one_row(model, error: Exception) -> str:
    """The message for a model whose trace on one datapoint raised ``error``."""
    return (
        f"{_described(model)} fails on a single datapoint ({error}); check that every "
        f"per-datapoint site is inside the {DATA_PLATE!r} plate and declares its event "
        "dims with .to_event(n)"
    )


def _described(model) -> str:
    return getattr(model, "program_name", type(model).__name__)


def _latent_nodes(trace):
    for name, site in trace.nodes.items():
        if is_latent_site(site) and not site["infer"].get("is_auxiliary"):
            yield name, site


def _latent_site(name: str, site: dict) -> LatentSite:
    fn = site["fn"]
    if DATA_PLATE not in {frame.name for frame in site["cond_indep_stack"]}:
        raise ValueError(
            f"latent site {name!r} is outside the {DATA_PLATE!r} plate: per-datapoint "
            "estimators need every latent variable to be local to a datapoint (sample it "
            f"inside pyro.plate({DATA_PLATE!r}, ...))"
        )
    batch_shape = tuple(fn.batch_shape)
    if batch_shape not in ((), (1,)):
        event = tuple(fn.event_shape)
        nested = [frame.name for frame in site["cond_indep_stack"] if frame.name != DATA_PLATE]
        inside = f" inside the plates {nested} nested in the data plate" if nested else ""
        raise ValueError(
            f"latent site {name!r} has batch shape {batch_shape} on one datapoint (event "
            f"shape {event}){inside}: every dim of a datapoint's latent must be an event dim; "
            f"declare them with .to_event({len(batch_shape)}) "
            f"(e.g. dist.Normal(loc, scale).to_event(1))"
            + (" in place of the nested plates" if nested else "")
        )
    support = fn.support
    if support.is_discrete:
        raise ValueError(
            f"latent site {name!r} has a discrete support ({support}): the library's "
            "estimators, local guides and AIS need continuous latents"
        )
    return LatentSite(name, torch.Size(fn.event_shape), one_row_support(support, fn.event_shape))


def leaf_distribution(fn):
    """The innermost distribution under any wrappers (``Independent``, masks, expansions,
    transforms): what a site draws from."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def is_periodic(fn) -> bool:
    """Whether a site's distribution is an angle's (``VonMises`` and kin): torch declares
    all of R its support, where its density repeats every 2 pi."""
    return isinstance(leaf_distribution(fn), (VonMises, SineBivariateVonMises, SineSkewed))


def periodic_latent_message(name: str, fn, where: str) -> str:
    """Why a periodic latent ``name`` is refused ``where`` (a draw over all of R)."""
    kind = type(leaf_distribution(fn)).__name__
    return (
        f"latent site {name!r} is {kind}, whose density repeats every 2 "
        "pi along the whole real line (torch declares that line as its support): over R "
        f"its integral is infinite, and {where} draws it over all of R, so log p(x) and the "
        "ELBO would read too high (by the periods the draws cover). Draw the angle from a "
        "distribution of one period (a VonMises guide), or give it a bounded support, e.g. "
        "z = pi * (2 * u - 1) with u ~ Beta(a, b)"
    )


def refuse_periodic_latents(trace, where: str) -> None:
    """Refuse a periodic latent of the model where the library draws it over R (AIS, the
    local fits and autoguide views work in the unconstrained space R^d)."""
    for name, site in _latent_nodes(trace):
        if is_periodic(site["fn"]):
            raise ValueError(periodic_latent_message(name, site["fn"], where))


def one_row_support(support: constraints.Constraint, event_shape) -> constraints.Constraint:
    """``support`` with each tensor parameter (an interval's bounds) cut to the event's
    dims. Inside the data plate a site's distribution is expanded to the trace's one
    row, and so are its bounds: ``Uniform(0, 2)`` has bounds of shape (1,), and a
    transform built on them would give every value an extra dim. The cut is a squeeze
    of size-1 dims: whether the bounds differ between rows is checked on every row by
    :func:`refuse_supports_varying_by_row`."""
    if isinstance(support, constraints.independent):
        base = one_row_support(support.base_constraint, event_shape)
        if base is support.base_constraint:
            return support
        return constraints.independent(base, support.reinterpreted_batch_ndims)
    keep = len(event_shape)
    cut = {name: value.reshape(value.shape[value.dim() - keep:])
           for name, value in tensor_parameters(support).items() if value.dim() > keep}
    if not cut:
        return support
    reduced = copy.copy(support)
    vars(reduced).update(cut)
    return reduced


def refuse_supports_varying_by_row(model, space: LatentSpace, x: Tensor, idx=None,
                                   num_data=None) -> None:
    """Refuse a latent whose support differs between the rows of ``x`` (``Uniform(0,
    x_n)``): a latent space maps every row through one transform, the first row's, as
    AIS, the local fits and an autoguide's per-datapoint view do. Only a support with
    tensor parameters needs the model's trace on every row."""
    bounded = [site.name for site in space.sites if tensor_parameters(site.support)]
    if not bounded or len(x) < 2:
        return
    with torch.no_grad(), pyro.validation_enabled(False):
        every_row = poutine.trace(model).get_trace(x, idx, num_data)
    for name in bounded:
        fn = every_row.nodes[name]["fn"]
        row_dim = 1 + len(fn.event_shape)  # the data plate's dim, from the right
        for bound, value in tensor_parameters(fn.support).items():
            if value.dim() >= row_dim and not bool((value == value.narrow(-row_dim, 0, 1)).all()):
                raise ValueError(
                    f"the support of latent site {name!r} ({_named(fn.support)}) differs "
                    f"between datapoints (its {bound} depends on the row): the library maps "
                    "every row through one transform of the support (in AIS, the local "
                    "fits, an autoguide read per datapoint), so it would use the first "
                    "row's for all. Give the latent a support that is the same for every "
                    "row (e.g. sample u in (0, 1) and use z = u * bound(x) in the model)"
                )


def _named(support) -> str:
    """A constraint's name without its tensors (an interval's bounds may be long)."""
    return type(base_support(support)).__name__.lstrip("_")


def tensor_parameters(support: constraints.Constraint) -> dict[str, Tensor]:
    """A constraint's tensor attributes (an interval's bounds), through ``independent``."""
    return {name: value for name, value in vars(base_support(support)).items()
            if isinstance(value, Tensor)}


def base_support(support: constraints.Constraint) -> constraints.Constraint:
    """The elementwise constraint inside any ``independent`` wrappers."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def _sum_to(value: Tensor, batch: torch.Size) -> Tensor:
    """Sum ``value`` over the dims right of ``batch`` (elementwise Jacobians)."""
    extra = value.dim() - len(batch)
    return value.sum(tuple(range(-extra, 0))) if extra > 0 else value


def is_latent_site(site) -> bool:
    """True for a trace node that is a latent sample site: sampled, not observed, and
    not a plate's subsample indices. Auxiliary guide sites count (a caller that must
    skip them checks ``site["infer"].get("is_auxiliary")``)."""
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
