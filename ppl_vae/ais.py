"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC) for log p(x).

For each datapoint x, AIS walks from an initial distribution q(z) to the posterior along
the geometric path

    f_t(z) = q(z)^(1 - beta_t) p(x, z)^beta_t,      0 = beta_0 <= ... <= beta_T = 1,

with HMC transitions that leave each f_t invariant, and accumulates the log weight

    log w = sum_t (beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log q(z_{t-1})].

E[w] = p(x), so the log of the mean weight over chains is a stochastic lower bound
on log p(x) (Neal, 2001). Run in reverse from an exact posterior sample, the same
chain gives a stochastic upper bound; on data simulated from the model, where the
latents that made x are such a sample, the two bound log p(x) from both sides: BDMC
(Grosse, Ghahramani & Adams, 2015; Wu, Burda, Salakhutdinov & Grosse, 2017).

Everything runs in the unconstrained space of the model's latents (``LatentSpace``):
every latent site in the ``"data"`` plate, any name, event shape or support, with the
log-Jacobian of ``biject_to(support)`` in the density. Densities and their gradients
come from traces of the model itself (and of the guide, when it is the initial
distribution). Chains x datapoints are one vectorized state; rows go in chunks, and
under torch.distributed the chunks are shared out over the processes.

Step sizes. A chain whose step size is steered by its own acceptances is no longer a
fixed sequence of f_t-invariant kernels, and its weight loses its unbiasedness (we
measured +0.01 to +0.03 nats of upward bias on a 2-D quadrature model); steering it
from the other chains of its datapoint is not enough either, since their step sizes
in turn depend on its past. So ``adapt=True`` runs ``pilot_chains`` extra chains per
datapoint beside the real ones, in the same vectorized state: the step size of a
datapoint follows the mean acceptance probability of its pilot chains alone (a
multiplicative Robbins-Monro rule toward ``target_accept``), and the pilot chains'
weights are discarded. The real chains' kernels are then a sequence fixed by
randomness independent of them, and each real weight stays unbiased.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vae.ais_results import AISResult, BDMCResult
from ppl_vae.densities import nan_sites
from ppl_vae.distributed import gathered, my_share
from ppl_vae.guides.latent_space import LatentSpace
from ppl_vae.hmc import Noise, Target, hmc_transition
from ppl_vae.programs import as_programs
from ppl_vae.seeding import Block, base_seed, blocks, caller_rng_kept, check_seed
from ppl_vae.settings import frozen, module_local
from ppl_vae.structure import check_conditionable, check_guide, check_rows, check_structure
from ppl_vae.validation import as_data, positive_int

SCHEDULES = ("linear", "sigmoid")
# Wu et al.'s sigmoid schedule sigma(delta (2t/T - 1)) with delta = 4.
SIGMOID_DELTA = 4.0
# Multiplicative step-size rule: log eps += ADAPT_GAIN * (acceptance - target). From the
# prior on the digits VAE at 30 steps, 0.05 left the step size far too small (0.05 grew
# to 0.08 at an acceptance of 0.996) and AIS 0.13 +- 0.07 nats below a Cremer-style loop;
# 0.2 gets there (-0.02 +- 0.06). A warm-up of the pilot chains at the first beta did
# worse: the step size it finds for the prior is too large for the posterior.
ADAPT_GAIN = 0.2
STEP_SIZE_RANGE = (1e-4, 1.0)
# Chains per datapoint that only steer the step size.
PILOT_CHAINS = 4
# The transitions' defaults, one source for ais(), bdmc() and ais_trusted().
NUM_STEPS, NUM_CHAINS, LEAPFROG_STEPS = 1000, 16, 10
STEP_SIZE, TARGET_ACCEPT, SCHEDULE = 0.05, 0.65, "sigmoid"
# Chains x rows x data-dims per chunk: bounds the memory of the decoder's temporaries.
# At 2**22 (16 MB of float32 per temporary) 200 MNIST points x 68 chains ran 1.3x to
# 1.5x slower than at 2**20 (4 MB), most of it faulting in fresh pages; a row's numbers
# do not depend on the chunks.
CHUNK_ELEMENTS = 2**20


@dataclass(frozen=True)
class _Settings:
    num_chains: int
    pilot_chains: int
    leapfrog_steps: int
    step_size: float
    target_accept: float
    adapt: bool
    seed: int
    progress: bool
    jit: bool = True


@module_local
def ais(
    model,
    x,
    *,
    proposal=None,
    num_steps: int = NUM_STEPS,
    num_chains: int = NUM_CHAINS,
    leapfrog_steps: int = LEAPFROG_STEPS,
    step_size: float = STEP_SIZE,
    target_accept: float = TARGET_ACCEPT,
    adapt: bool = True,
    pilot_chains: int = PILOT_CHAINS,
    schedule: str | Sequence[float] = SCHEDULE,
    idx: Tensor | None = None,
    num_data: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    jit: bool = True,
    plate: str | None = None,
) -> AISResult:
    """log p(x) per datapoint by annealed importance sampling with HMC transitions.

    Parameters
    ----------
    model, x : Pyro program taking the data, Tensor or ndarray of shape (N, D)
        Every latent site of the model is in its data plate (named by ``plate``).
    proposal : guide, optional
        The initial distribution: the prior when None, else the guide's q(z | x).
    num_steps, num_chains, schedule : int, int, {"linear", "sigmoid"} or T + 1 betas
        AIS budget: T intermediate distributions, independent runs per datapoint.
    leapfrog_steps, step_size, target_accept, adapt, pilot_chains, jit : optional
        HMC settings and the traced potential; every option is in :doc:`ais`.
    idx, num_data, seed, progress : optional
        Rows of ``x`` in the dataset and its size (local guides), seed, progress bar.

    Returns
    -------
    AISResult

    Examples
    --------
    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA
    >>> from ppl_vae.guides import ExactPosterior
    >>> _ = torch.manual_seed(0)
    >>> model, x = PPCA(5, 2), torch.randn(8, 5)
    >>> result = ppl_vae.ais(model, x, proposal=ExactPosterior(model), num_steps=5,
    ...                      num_chains=4, seed=0, progress=False)
    >>> torch.allclose(result.log_marginal, model.score_samples(x), atol=1e-4)
    True
    """
    model, proposal, x, idx, num_data, betas, settings, space = _checked(
        model, x, proposal, num_steps, num_chains, leapfrog_steps, step_size,
        target_accept, adapt, pilot_chains, schedule, idx, num_data, seed, progress, jit,
        plate,
    )
    return _run(model, proposal, space, x, idx, num_data, betas, settings, reverse_from=None)


@module_local
def bdmc(
    model,
    x,
    latents: dict[str, Tensor],
    *,
    num_steps: int = NUM_STEPS,
    num_chains: int = NUM_CHAINS,
    proposal=None,
    leapfrog_steps: int = LEAPFROG_STEPS,
    step_size: float = STEP_SIZE,
    target_accept: float = TARGET_ACCEPT,
    adapt: bool = True,
    pilot_chains: int = PILOT_CHAINS,
    schedule: str | Sequence[float] = SCHEDULE,
    seed: int | None = None,
    progress: bool = True,
    jit: bool = True,
    plate: str | None = None,
) -> BDMCResult:
    """Sandwich log p(x) between forward and reverse AIS on simulated data.

    Reverse AIS starts from the latents that generated x (``sample_from_model``), an
    exact posterior draw, so ``upper - lower`` bounds the error of AIS (:doc:`ais`).

    Parameters
    ----------
    model, x, proposal, num_steps, num_chains, ... : as for :func:`ais`
    latents : dict of str to Tensor
        The value of every latent site of the model for each row of x, shape
        ``(N, *event_shape)``.

    Returns
    -------
    BDMCResult

    Examples
    --------
    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA
    >>> _ = torch.manual_seed(0)
    >>> model = PPCA(5, 2)
    >>> x, latents = ppl_vae.sample_from_model(model, 8, seed=0)
    >>> result = ppl_vae.bdmc(model, x, latents, num_steps=20, num_chains=4, seed=0,
    ...                       progress=False)
    >>> result.lower.shape, bool(result.gap > 0)  # more steps close the sandwich
    (torch.Size([8]), True)
    """
    model, proposal, x, idx, num_data, betas, settings, space = _checked(
        model, x, proposal, num_steps, num_chains, leapfrog_steps, step_size,
        target_accept, adapt, pilot_chains, schedule, None, None, seed, progress, jit,
        plate,
    )
    exact = space.flatten(_checked_latents(latents, space, x))
    forward = _run(model, proposal, space, x, idx, num_data, betas, settings, None)
    reverse_settings = _Settings(**{**settings.__dict__, "seed": settings.seed ^ 0x5A5A5A5A})
    reverse = _run(model, proposal, space, x, idx, num_data, betas, reverse_settings, exact)
    return BDMCResult(lower=forward.log_marginal, upper=reverse.log_marginal,
                      forward=forward, reverse=reverse)


def ais_trusted(model, proposal, space: LatentSpace, x: Tensor, *, num_steps: int,
                num_chains: int, seed: int, progress: bool = True) -> AISResult:
    """The core of :func:`ais` with its default transitions, for callers inside the
    library that have checked the model, its latent space, the proposal and ``x``
    (all rows of the dataset)."""
    settings = _Settings(num_chains=num_chains, pilot_chains=PILOT_CHAINS,
                         leapfrog_steps=LEAPFROG_STEPS, step_size=STEP_SIZE,
                         target_accept=TARGET_ACCEPT, adapt=True, seed=seed,
                         progress=progress)
    idx = torch.arange(len(x), device=x.device)
    betas = schedule_betas(SCHEDULE, num_steps)
    return _run(model, proposal, space, x, idx, len(x), betas, settings, reverse_from=None)


def schedule_betas(schedule: str | Sequence[float], num_steps: int) -> Tensor:
    """The T + 1 betas of a named schedule, or a checked user array (float64)."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or an array, got {schedule!r}")
        t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
        if schedule == "linear":
            return t
        s = torch.sigmoid(SIGMOID_DELTA * (2 * t - 1))
        return (s - s[0]) / (s[-1] - s[0])
    betas = torch.as_tensor(np.asarray(schedule, dtype=np.float64))
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError(f"schedule must hold at least 2 betas, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all() or (betas.diff() < 0).any():
        raise ValueError("schedule must be finite and non-decreasing")
    if betas[0] != 0 or betas[-1] != 1:
        raise ValueError(
            f"schedule must run from 0 to 1, got {float(betas[0])} to {float(betas[-1])}"
        )
    return betas


# ----------------------------------------------------------------------- validation


def _checked(model, x, proposal, num_steps, num_chains, leapfrog_steps, step_size,
             target_accept, adapt, pilot_chains, schedule, idx, num_data, seed, progress,
             jit=True, plate=None):
    """Every argument, the model's latent space and the proposal, checked before work."""
    x = as_data(x, model)
    idx, num_data = check_rows(x, idx, num_data)
    model, proposal = as_programs(model, proposal, x, plate=plate, num_data=num_data)
    positive_int(num_steps, "num_steps")
    betas = schedule_betas(schedule, num_steps)
    if not (isinstance(step_size, (int, float)) and 0 < step_size < math.inf):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    if not (isinstance(target_accept, (int, float)) and 0 < target_accept < 1):
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
    settings = _Settings(
        num_chains=positive_int(num_chains, "num_chains"),
        pilot_chains=positive_int(pilot_chains, "pilot_chains") if adapt else 0,
        leapfrog_steps=positive_int(leapfrog_steps, "leapfrog_steps"),
        step_size=float(step_size),
        target_accept=float(target_accept),
        adapt=bool(adapt),
        seed=base_seed(check_seed(seed)),
        progress=progress,
        jit=bool(jit),
    )
    # The checks trace the model and the proposal: a seeded call leaves the caller's
    # generators where they were.
    with caller_rng_kept(seed is not None):
        space = check_structure(model, x, idx, num_data, data_dtype=True, unconstrained=True)
        if proposal is not None:
            check_guide(model, proposal, x, idx, num_data)
            check_conditionable(proposal, x, idx, num_data)
    return model, proposal, x, idx, num_data, betas, settings, space


def _checked_latents(latents, space: LatentSpace, x: Tensor) -> dict[str, Tensor]:
    if not isinstance(latents, dict):
        raise ValueError(f"latents must be a dict of site name to Tensor, got {type(latents)}")
    missing = [name for name in space.names if name not in latents]
    if missing:
        raise ValueError(f"latents lacks the model's latent sites {missing}")
    out = {}
    for site in space.sites:
        value = torch.as_tensor(latents[site.name]).to(x)
        expected = (len(x), *site.event_shape)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"latents[{site.name!r}] must have shape {expected} (one value per row of "
                f"x), got {tuple(value.shape)}"
            )
        if not bool(site.support.check(value).all()):
            raise ValueError(f"latents[{site.name!r}] has values outside the site's support")
        out[site.name] = value
    return out


# -------------------------------------------------------------------------- the run


def _run(model, guide, space, x, idx, num_data, betas, settings, reverse_from) -> AISResult:
    """Forward AIS (``reverse_from=None``) or reverse AIS from exact unconstrained latents."""
    start = time.perf_counter()
    total = settings.num_chains + settings.pilot_chains
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (total * max(x.shape[1], space.dim)))
    n = len(x)
    log_w = x.new_zeros(settings.num_chains, n)
    acceptance, step_size = x.new_zeros(n), x.new_zeros(n)
    mine = my_share(list(blocks(idx)))
    chunks = list(_chunks(mine, rows_per_chunk)) if mine else []
    bar = tqdm(total=len(chunks) * (len(betas) - 1), disable=not settings.progress,
               desc="AIS" if reverse_from is None else "reverse AIS", unit="step")
    # AIS differentiates with respect to the latents only: the parameters leave the
    # autograd graph (and can be constants of a traced potential).
    with caller_rng_kept(), pyro.validation_enabled(False), frozen(model, guide):
        for chunk in chunks:
            # The chains run on the chunk's real rows; the padded rows only fix the draws.
            padded = torch.cat([b.rows for b in chunk]).to(x.device)
            positions = torch.cat([b.positions for b in chunk]).to(x.device)
            target = Target(model, guide, space, x[positions], idx[positions], num_data,
                             jit=settings.jit)
            noise = Noise(chunk, settings.seed, total, x[padded], idx[padded])
            exact = None if reverse_from is None else reverse_from[positions]
            out = _anneal(target, noise, betas, settings, exact, bar)
            if bool(torch.isnan(out[0]).any()):
                _refuse_nan(target, noise, exact, out[0])
            log_w[:, positions] = out[0]
            acceptance[positions], step_size[positions] = out[1], out[2]
    bar.close()
    owned = torch.zeros(n, dtype=torch.bool)
    for block in mine:
        owned[block.positions] = True
    log_w = gathered(log_w, owned, dim=1)
    acceptance, step_size = gathered(acceptance, owned, 0), gathered(step_size, owned, 0)
    if reverse_from is not None:
        log_w = -log_w  # the reverse weights estimate 1 / p(x)
    return _result(log_w, acceptance, step_size, len(betas) - 1, time.perf_counter() - start,
                   upper=reverse_from is not None)


def _chunks(all_blocks: list[Block], rows_per_chunk: int) -> Iterator[list[Block]]:
    per_chunk = max(1, rows_per_chunk // len(all_blocks[0].rows))
    for i in range(0, len(all_blocks), per_chunk):
        yield all_blocks[i : i + per_chunk]


def _result(log_w, acceptance, step_size, num_steps, seconds, upper: bool) -> AISResult:
    c = log_w.shape[0]
    lme = torch.logsumexp(log_w, 0) - math.log(c)
    w = (log_w - lme).exp()
    se = w.std(0) / math.sqrt(c) if c > 1 else torch.full_like(lme, float("nan"))
    log_marginal = -lme if upper else lme
    stored = -log_w if upper else log_w
    return AISResult(
        log_marginal=log_marginal, log_marginal_se=se, log_weights=stored,
        ess=c**2 / w.square().sum(0), acceptance=acceptance, step_size=step_size,
        num_steps=num_steps, num_chains=c, seconds=seconds,
    )


def _anneal(target: Target, noise: Noise, betas: Tensor, settings: _Settings,
            exact: Tensor | None, bar) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk of rows: (log weights [num_chains, B], acceptance [B], step size [B])."""
    chains = noise.chains
    u = noise.initial(target) if exact is None else exact.expand(chains, *exact.shape).clone()
    here = target.values(u)  # then each transition hands on the Point it ends at
    rows = u.shape[1]
    eps = u.new_full((rows,), settings.step_size)
    log_w = u.new_zeros(chains, rows)
    accept_sum = u.new_zeros(rows)
    betas = betas.tolist()
    steps = len(betas) - 1
    order = range(1, steps + 1) if exact is None else range(steps, 0, -1)
    for i, t in enumerate(order):
        # Weight at the current state, then move it with the kernel of the next beta.
        beta_here, beta_before = betas[t], betas[t - 1]
        next_beta = (betas[t] if t < steps else None) if exact is None else (
            betas[t - 1] if t > 1 else None)
        log_w += (beta_here - beta_before) * (here.log_p - here.log_q)
        if next_beta is not None:
            here, accept = hmc_transition(target, here, next_beta, eps,
                                          settings.leapfrog_steps, noise)
            real = accept[: settings.num_chains].mean(0)
            accept_sum += real
            if settings.adapt:
                pilot = accept[settings.num_chains :].mean(0)
                eps = _adapted(eps, pilot, settings.target_accept)
        bar.update()
        if settings.progress and i % 25 == 0:
            bar.set_postfix(beta=f"{beta_here:.3f}",
                            accept=f"{float(accept_sum.mean()) / max(1, i + 1):.2f}",
                            refresh=False)
    acceptance = accept_sum / max(1, steps - 1)
    return log_w[: settings.num_chains], acceptance, eps


def _refuse_nan(target: Target, noise: Noise, exact, log_w: Tensor) -> None:
    """A NaN AIS weight: name the sites whose density is NaN at the chains' start."""
    chains = noise.chains
    u = noise.initial(target) if exact is None else exact.expand(chains, *exact.shape)
    values, _ = target.space.unflatten(u)
    with torch.no_grad(), pyro.plate("particles", chains, dim=-2):
        trace = poutine.trace(poutine.condition(target.model, data=values)).get_trace(
            target.x, target.idx, target.num_data)
    found = nan_sites({"model": trace}, tuple(u.shape[:2]), target.idx)
    rows = target.idx[torch.isnan(log_w).any(0)].tolist()
    where = "; ".join(found) if found else f"datapoints {rows[:8]}"
    raise ValueError(
        f"AIS weights are NaN at {where}: the model's (or proposal's) log-density is NaN "
        "there, which is a bug in the model, not a weight of zero; no estimate is returned"
    )


def _adapted(eps: Tensor, acceptance: Tensor, target_accept: float) -> Tensor:
    return (eps * torch.exp(ADAPT_GAIN * (acceptance - target_accept))).clamp(*STEP_SIZE_RANGE)
