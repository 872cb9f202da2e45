"""The best per-datapoint guide q*: a local guide fitted with the model frozen.

``fit_local`` builds a local guide of a family ("diag", "full", "flow") over every latent
site of the model, starts each row from the prior, an encoder or any guide's moments, and
fits all rows in one vectorized run whose every row converges on its own
(:mod:`ppl_vae.row_convergence`). ``gaps`` and ``refine`` start from here.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

from ppl_vae.distributed import local_only
from ppl_vae.guides.latent_space import LatentSpace, is_latent_site
from ppl_vae.guides.local import (
    FAMILIES,
    LOCAL_GUIDES,
    LocalDiag,
    LocalFlow,
    LocalFull,
    family_of,
)
from ppl_vae.local_elbo import LocalELBO, gather_rows, owned_rows
from ppl_vae.programs import as_programs
from ppl_vae.row_convergence import (
    EVAL_STREAM,
    INIT_STREAM,
    Noised,
    RowPlateau,
    row_noise,
)
from ppl_vae.seeding import ROW_BLOCK, base_seed, blocks, caller_rng_kept, check_seed, seed_torch
from ppl_vae.settings import module_local
from ppl_vae.structure import check_structure, described
from ppl_vae.train import FitResult, fit_trusted
from ppl_vae.validation import as_data, one_of, positive_int


@module_local
def fit_local(
    model,
    x,
    family: str = "diag",
    *,
    init_from=None,
    steps: int | None = None,
    lr: float = 3e-2,
    num_particles: int = 8,
    batch_size: int | None = None,
    tol: float = 1e-3,
    window: int = 50,
    progress: bool = True,
    seed: int | None = None,
    plate: str | None = None,
) -> LocalDiag | LocalFull | LocalFlow:
    """Fit a local guide, one q_n per datapoint, with the model's parameters frozen, in
    one vectorized fit where each row converges on its own (see :doc:`gaps`).

    Parameters
    ----------
    model, x : PyroModule, Tensor or ndarray of shape (N, D)
        The model's parameters are left bit-for-bit unchanged.
    family : {"diag", "full", "flow"}
        A ``LocalDiag``, ``LocalFull`` or ``LocalFlow`` guide over the latents.
    init_from : guide, optional
        Where each row starts (a Gaussian encoder is copied); the prior's moments if None.
    steps, lr, num_particles, batch_size, tol, window, progress, seed : optional
        Most Adam steps (None: the family's ``SCHEDULES``; the flow's rates go to zero
        over them), initial rate, particles, rows per step (None: all); the plateau rule.

    Returns
    -------
    LocalDiag, LocalFull or LocalFlow, with parameters of shape (N, ...).

    Examples
    --------
    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(16, 2) @ torch.randn(2, 5) + torch.randn(16, 5)
    >>> model = PPCA.from_data(x, latent_dim=2)
    >>> q = ppl_vae.fit_local(model, x, "full", steps=300, seed=0, progress=False)
    >>> gap = model.score_samples(x) - ppl_vae.elbo(model, q, x, num_samples=100, seed=0)
    >>> bool(gap.mean().abs() < 0.02)
    True
    """
    x = as_data(x, model)
    model, init_from = as_programs(model, init_from, x, plate=plate)
    # The fit seeds torch's generator as fit(seed=) does; a seeded call then leaves the
    # caller's generators where they were, as every seeded estimate does.
    with caller_rng_kept(check_seed(seed) is not None):
        space = check_structure(model, x, data_dtype=True, unconstrained=True)
        return fit_local_trusted(
            model, x, family, init_from=init_from, steps=steps, lr=lr,
            num_particles=num_particles, batch_size=batch_size, tol=tol, window=window,
            progress=progress, seed=seed, space=space,
        )[0]


# Per family: the default most steps, and whether the guide's gradient sticks the landing
# with every row's rate on a cosine to zero over the steps. On 48 MNIST test points with
# the trained VAE (benchmarks/fit_local_schedule.py), 1000 such steps reach a higher ELBO
# than 3000 plain steps under the plateau rule alone, in half the time: flow +0.11 (0.01)
# nats (full +0.10 (0.01) on 16 points). The Gaussian families keep the plain gradient
# and 3000 steps: the diagonal lost 0.04 (0.01) nats that way on 16 MNIST points, and the
# full one, on an ill-conditioned PPCA posterior, needs more than 1000 steps to bring its
# mean KL to the exact posterior under 0.01 nats (tests/guides/test_local.py).
SCHEDULES = {"diag": (3000, False), "full": (3000, False), "flow": (1000, True)}
# Fits of fewer steps run the loss untraced: a trace pays for its recording and its
# checked calls only over enough steps. Traced against untraced, 1 thread, on the digits
# VAE (300 rows) and the MNIST one (16 rows), diagonal and flow families: 1.22x-1.38x
# the time at 30 steps, 0.91x-1.10x at 100, 0.88x-0.96x at 200.
TRACE_FROM_STEPS = 100


def fit_local_trusted(model, x, family, *, init_from, steps, lr, num_particles, batch_size=None,
               tol=1e-3, window=50, progress=True, seed=None, space=None, sticking=None,
               anneal=None) -> tuple:
    """The fit behind fit_local and gaps, on data they have already checked (its own
    settings are checked here, once). Every row converges on its own (see
    :mod:`ppl_vae.row_convergence`). ``steps``, ``sticking`` and ``anneal`` None: the
    family's (``SCHEDULES``); ``sticking=False, anneal=False``: the plain reparameterized
    gradient and the plateau rule alone (every family before issue 21)."""
    one_of(family, FAMILIES, "family")
    default_steps, stl = SCHEDULES[family]
    steps = default_steps if steps is None else positive_int(steps, "steps")
    sticking = stl if sticking is None else bool(sticking)
    anneal = stl if anneal is None else bool(anneal)
    num_particles = positive_int(num_particles, "num_particles")
    window = positive_int(window, "window")
    seed = base_seed(check_seed(seed))
    batch_size = len(x) if batch_size is None else min(positive_int(batch_size, "batch_size"),
                                                       len(x))
    guide = initial_local(model, x, family, init_from, seed=seed, space=space)
    # Under torch.distributed each rank fits its own rows (see ppl_vae.local_elbo), with
    # fit's own sharding (DDP, minibatch shares) switched off by local_only; a rank
    # stops when the rows of every rank have stopped.
    owned = owned_rows(len(x), x.device)
    loss = LocalELBO(num_particles, guide.space.names, owned, sticking=sticking)
    shape = (num_particles, guide.latent_dim)

    def noise(step: int) -> Tensor:
        return row_noise(seed, len(x), shape, step, dtype=x.dtype, device=x.device)

    # A full batch holds every row in order at every step (ppl_vae.batches.Batches).
    noised = Noised(guide, noise(0), whole=batch_size == len(x))
    measured = Noised(guide, noise(EVAL_STREAM), whole=True)
    everything = torch.arange(len(x), device=x.device)

    def measure() -> Tensor:
        with torch.no_grad():
            return loss.row_elbo(model, measured, x, everything, len(x))

    schedule = RowPlateau(lr, len(x), tol=tol, window=window, measure=measure,
                          set_step=lambda step: noised.noise.copy_(noise(step)), owned=owned,
                          steps=steps if anneal else None)
    with local_only():
        result: FitResult = fit_trusted(
            model, noised, x, batch_size=batch_size, total=steps,
            optimizer=schedule.optimizer, loss=loss, seed=seed, progress=progress,
            train_model=False, callback=schedule,
            jit=owned is None and steps >= TRACE_FROM_STEPS,
        )
    gather_rows(guide, owned)
    return guide, result


# Draws of a guide whose mean and covariance start a local guide; the prior, the same
# for every datapoint, is drawn on one datapoint only, so it can afford many more.
MOMENT_SAMPLES = 64
PRIOR_SAMPLES = 4096
# Rows per vectorized moment draw, which bounds its memory.
MOMENT_ROWS = 256


def initial_local(model, x, family, init_from, *, seed=None, space=None):
    """A local guide of ``family`` for every latent of ``model``, at its starting point.

    A Gaussian encoder of a single real site is copied (exactly where the family
    allows); any other guide, and the prior when ``init_from`` is None, gives its
    moments over u (see :func:`fit_local`). Row n's start depends only on (seed, x_n):
    the moments of a guide are drawn per block of rows, and the family's random
    parameters (a flow's coupling weights) are drawn block by block
    (:func:`_row_seeded`). ``space``: the model's LatentSpace, when the caller has it.
    """
    space = LatentSpace.of(model, x) if space is None else space
    cls = LOCAL_GUIDES[family]
    seed = base_seed(seed)
    q = None if init_from is None else _copyable_gaussian(init_from, x, space)
    with caller_rng_kept():
        if q is not None:
            loc, tril = _gaussian_parts(q)
        elif init_from is None:
            # The prior does not depend on x_n: one datapoint's draws serve every row.
            seed_torch(seed, MOMENT_SAMPLES)
            loc, tril = _moments(model, x[:1], space, PRIOR_SAMPLES)
            loc, tril = loc.expand(len(x), -1), tril.expand(len(x), -1, -1)
        else:
            loc, tril = _moments(init_from, x, space, seed=seed)
        return _row_seeded(cls, loc, tril, space, seed)


def _gaussian_parts(q) -> tuple[Tensor, Tensor]:
    """Mean (N, d) and Cholesky factor (N, d, d) of a Gaussian ``q`` (see family_of)."""
    if family_of(q) == "full":
        return q.loc.detach(), q.scale_tril.detach()
    return q.mean.detach(), torch.diag_embed(q.stddev.detach())


def _row_seeded(cls, loc: Tensor, tril: Tensor, space: LatentSpace, seed: int):
    """``cls.from_gaussian(loc, tril, space)``, built ``ROW_BLOCK`` rows at a time, each
    block under its own seed, so that the random parameters of a family (a flow's
    coupling weights) of row n depend only on (seed, n), not on how many rows there are."""
    n, parts = len(loc), []
    for block in range(math.ceil(n / ROW_BLOCK)):
        # Always a whole block (the last padded with copies of the last row): the draws
        # of a constructor depend on its number of rows.
        rows = torch.arange(block * ROW_BLOCK, (block + 1) * ROW_BLOCK).clamp(max=n - 1)
        seed_torch(seed, INIT_STREAM, block)
        parts.append(dict(cls.from_gaussian(loc[rows], tril[rows], space).named_parameters()))
    guide = cls.from_gaussian(loc, tril, space)
    with torch.no_grad():
        for name, param in guide.named_parameters():
            param.copy_(torch.cat([part[name] for part in parts])[:n])
    return guide


def _copyable_gaussian(guide, x, space: LatentSpace):
    """The guide's Gaussian q(z | x) when it is exactly a density of u, else None."""
    site = space.sites[0]
    if len(space.sites) > 1 or not site.is_real or site.event_shape != (space.dim,):
        return None
    if not callable(getattr(guide, "distribution", None)):
        return None
    with torch.no_grad():
        q = guide.distribution(x)
    try:
        family_of(q)
    except ValueError:
        return None
    if tuple(q.batch_shape) != (len(x),) or tuple(q.event_shape) != (space.dim,):
        return None
    return q


def _moments(fn, x, space: LatentSpace, num_samples: int = MOMENT_SAMPLES, *,
             seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Mean (N, d) and Cholesky factor (N, d, d) of ``fn``'s draws of u, row by row.

    ``fn`` is a guide, or the model (whose latents are then drawn from the prior). With
    a ``seed``, the rows are drawn in padded blocks of ``ROW_BLOCK``, each seeded by
    (seed, block), so row n's moments depend only on (seed, x_n); without one, in
    chunks of ``MOMENT_ROWS`` from the global generator.
    """
    idx = torch.arange(len(x), device=x.device)
    if seed is None:
        chunks = [(rows, slice(None)) for rows in torch.split(idx, MOMENT_ROWS)]
    else:
        chunks = [(block.rows.to(x.device), block.real.to(x.device), block.number)
                  for block in blocks(idx)]
    locs = torch.empty(len(x), space.dim, dtype=x.dtype, device=x.device)
    trils = torch.empty(len(x), space.dim, space.dim, dtype=x.dtype, device=x.device)
    with torch.no_grad(), pyro.validation_enabled(False):
        for rows, real, *number in chunks:
            if number:
                seed_torch(seed, INIT_STREAM + 1, number[0])
            u = _draws_of_u(fn, x, rows, space, num_samples)
            loc, tril = _gaussian_fit(u)
            locs[rows[real]], trils[rows[real]] = loc[real], tril[real]
    return locs, trils


def _draws_of_u(fn, x, rows, space: LatentSpace, num_samples: int) -> Tensor:
    """``num_samples`` draws of u for the rows ``rows`` of x, shape (S, B, d)."""
    with pyro.plate("particles", num_samples, dim=-2):
        trace = poutine.trace(fn).get_trace(x[rows], rows, len(x))
    missing = [name for name in space.names if name not in trace.nodes]
    if missing:
        raise ValueError(
            f"{type(fn).__name__} has no site for the model's latents {missing}: "
            "it cannot start a local guide"
        )
    u = space.flatten({name: trace.nodes[name]["value"] for name in space.names})
    return u.expand(num_samples, len(rows), space.dim)


def _gaussian_fit(u: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and Cholesky factor of draws u (S, B, d), per row, ignoring non-finite draws.

    (A Normal guide on a positive latent puts draws outside the support: their u is
    NaN.) The covariance is shrunk towards its diagonal by d / (S + d), which keeps it
    positive definite for d >= S; a row with fewer than two finite draws gets N(0, I).
    """
    s, _, d = u.shape
    finite = torch.isfinite(u).all(-1, keepdim=True)
    weight = finite.to(u.dtype)
    count = weight.sum(0)
    u = torch.where(finite, u, torch.zeros((), dtype=u.dtype))
    loc = (weight * u).sum(0) / count.clamp(min=1)
    centered = (u - loc) * weight
    cov = torch.einsum("sbi,sbj->bij", centered, centered) / (count - 1).clamp(min=1)[..., None]
    shrink = d / (s + d)
    cov = (1 - shrink) * cov + shrink * torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    few = (count < 2)[..., None]
    loc = torch.where(few[..., 0], torch.zeros((), dtype=u.dtype), loc)
    cov = torch.where(few, eye, cov)
    # A point mass (zero variance) still needs a valid Cholesky factor.
    jitter = 1e-8 * (1 + cov.diagonal(dim1=-2, dim2=-1).mean(-1))[..., None, None]
    return loc, torch.linalg.cholesky(cov + jitter * eye)


def local_family(guide, x, local, match_family) -> str:
    """The local family to fit: ``local`` if given, checked against the guide's own."""
    if local is not None:
        one_of(local, FAMILIES, "local")
    family = guide_family(guide, x)
    name = described(guide)
    if family is None:
        if local is None:
            raise ValueError(
                f"cannot tell the variational family of {name} (a guide with several "
                "sites, or not a Normal/MultivariateNormal, and no `family` attribute): "
                f"pass local= one of {FAMILIES}, or give the guide a `family` attribute"
            )
        return local
    if local is None:
        if family not in FAMILIES:
            raise ValueError(
                f"{name} has family {family!r}, which has no local counterpart: local "
                f"families are {FAMILIES} (Gaussian or flow); pass local= one of them with "
                "match_family=False to compare across families on purpose"
            )
        return family
    if local != family and match_family:
        raise ValueError(
            f"local={local!r} but {name} is of family {family!r}: the amortization gap "
            "L[q*] - L[q] means what amortization costs only when q* is the best member "
            "of the encoder's own family (otherwise it mixes in the difference between "
            f"families); use local={family!r}, or match_family=False to compare across "
            "families on purpose"
        )
    return local


def guide_family(guide, x: Tensor) -> str | None:
    """The variational family of ``guide``: its ``family`` attribute, else its trace.

    From the trace, a guide with one latent site (and no auxiliary one) is ``"diag"``
    for a Normal, ``"full"`` for a MultivariateNormal, ``"delta"`` for a point mass;
    anything else gives None (unknown).
    """
    family = getattr(guide, "family", None)
    if family is not None:
        return family
    first = torch.zeros(1, dtype=torch.long, device=x.device)
    with torch.no_grad(), pyro.validation_enabled(False):
        trace = poutine.trace(guide).get_trace(x[:1], first, len(x))
    sites = [site for site in trace.nodes.values() if is_latent_site(site)]
    if len(sites) != 1 or sites[0]["infer"].get("is_auxiliary"):
        return None
    fn = sites[0]["fn"]
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    if isinstance(fn, dist.Delta):
        return "delta"
    try:
        return family_of(fn)
    except ValueError:
        return None
