"""The annealing path's potential and HMC's moves: what one AIS chunk runs on.

:class:`Target` gives log q(u), log p(x, u) and their gradients for a chunk of rows
(optionally through a traced potential, checked against the plain one) as a
:class:`Point`; a transition moves every chain with HMC and returns the Point it ends
at, so that neither the next weight nor the next transition's first gradient is
computed again; :class:`Noise` draws momenta and uniforms per block of rows from
generators seeded by (seed, block), so a row's chains do not depend on the rows beside
it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from torch import Tensor

from ppl_vae.densities import log_density, log_joint
from ppl_vae.guides.latent_space import LatentSpace
from ppl_vae.models.distributions import binary_check_may_be_frozen
from ppl_vae.seeding import Block, seed_torch
from ppl_vae.seeding import generator as block_generator


class Target:
    """log q(u), log p(x, u) and their gradients (as :class:`Point`) for one chunk."""

    def __init__(self, model, guide, space: LatentSpace, x, idx, num_data, jit=False):
        self.model, self.guide, self.space = model, guide, space
        self.x, self.idx, self.num_data = x, idx, num_data
        self.q = None if guide is None else fixed_distribution(guide, space, x, idx)
        # The traced potential, by the shape of u; False once tracing has failed. Only
        # in float32, where it pays: in float64 the traced arithmetic differed from the
        # plain one by 3e-8 nats on a PPCA, beyond float64 rounding.
        self._traced: dict | bool = {} if jit and x.dtype == torch.float32 else False

    def initial(self, chains: int) -> Tensor:
        """u of shape (chains, B, d) drawn from the initial distribution."""
        with torch.no_grad(), pyro.plate("particles", chains, dim=-2):
            if self.q is not None:
                return self.q.sample((chains,))
            if self.guide is None:
                trace = poutine.trace(self.model).get_trace(self.x, self.idx, self.num_data)
            else:
                trace = poutine.trace(self.guide).get_trace(self.x, self.idx, self.num_data)
        values = {name: trace.nodes[name]["value"] for name in self.space.names}
        return self.space.flatten(values)

    def parts(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(log q(u), log p(x, u)), each of shape (C, B), in the unconstrained space."""
        if self.q is not None:
            return self.q.log_prob(u), self._potential(u)[0]
        return self._potential(u)

    def point(self, u: Tensor, beta: float) -> Point:
        """The densities at u and their gradients: log q's and log p's apart when q is a
        fixed distribution (the Point then serves every beta), else d/du log f_beta."""
        with torch.enable_grad():
            if self.q is not None:
                # Two leaves: one backward pass gives both gradients, each of its own part.
                at_q, at_p = u.detach().requires_grad_(True), u.detach().requires_grad_(True)
                log_q, (log_p,) = self.q.log_prob(at_q), self._potential(at_p)
                grad_q, grad_p = torch.autograd.grad(log_q.sum() + log_p.sum(), (at_q, at_p))
                return Point(u.detach(), log_q.detach(), log_p.detach(), grad_q, grad_p)
            u = u.detach().requires_grad_(True)
            log_q, log_p = self._potential(u)
            log_f = (1.0 - beta) * log_q + beta * log_p
            (grad,) = torch.autograd.grad(log_f.sum(), u)
        return Point(u.detach(), log_q.detach(), log_p.detach(), None, grad, beta)

    def values(self, u: Tensor) -> Point:
        """The densities at u, without gradients."""
        with torch.no_grad():
            log_q, log_p = self.parts(u)
        return Point(u, log_q, log_p, None, None, None)

    def _potential(self, u: Tensor) -> tuple[Tensor, ...]:
        """What the trace holds: (log p,) when q is fixed, else (log q, log p)."""
        if self._traced is not False:
            traced = self._traced.get(u.shape)
            if traced is None:
                traced = self._traced[u.shape] = self._trace(u)
            if traced is not False:
                return traced(u)
            self._traced = False
        return self._plain_parts(u)

    def _trace(self, u: Tensor):
        """The potential traced at u's shape, checked against the plain one; or False."""
        probe = u.detach()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with binary_check_may_be_frozen():  # x is a constant of this trace
                    traced = torch.jit.trace(self._plain_parts, (probe,), check_trace=False)
                got, expected = traced(probe), self._plain_parts(probe)
            except Exception as error:  # noqa: BLE001 - any failure means: run it plainly
                warnings.warn(f"the AIS potential could not be traced ({error}); running "
                              "it plainly", stacklevel=6)
                return False
        if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-4, equal_nan=True)
                   for a, b in zip(got, expected, strict=True)):
            warnings.warn("the traced AIS potential differs from the plain one (random ops "
                          "or a structure that changes between calls?); running it plainly "
                          "(pass jit=False to skip tracing)", stacklevel=6)
            return False
        return traced

    def _plain_parts(self, u: Tensor) -> tuple[Tensor, ...]:
        log_prior, log_lik = log_joint(self.model, self.space, self.x, self.idx,
                                       self.num_data, u)
        log_p = log_prior + log_lik
        if self.q is not None:
            return (log_p,)
        if self.guide is None:
            return log_prior, log_p
        return self._log_q(u), log_p

    def _log_q(self, u: Tensor) -> Tensor:
        values, log_det = self.space.unflatten(u)
        with pyro.plate("particles", u.shape[0], dim=-2):
            conditioned = poutine.condition(self.guide, data=values)
            trace = poutine.trace(conditioned).get_trace(self.x, self.idx, self.num_data)
        return log_density(trace, tuple(u.shape[:2])) + log_det


@dataclass(frozen=True)
class Point:
    """Chains at u (C, B, d) with log q and log p there (C, B), and their gradients:
    ``grad_q`` and ``grad_p`` apart (then any beta's gradient follows), or, with
    ``grad_q`` None, ``grad_p`` holds d/du log f at ``beta`` alone (None: no gradient)."""

    u: Tensor
    log_q: Tensor
    log_p: Tensor
    grad_q: Tensor | None = None
    grad_p: Tensor | None = None
    beta: float | None = None

    def log_f(self, beta: float) -> Tensor:
        return (1.0 - beta) * self.log_q + beta * self.log_p

    def has_grad(self, beta: float) -> bool:
        return self.grad_q is not None or (self.grad_p is not None and self.beta == beta)

    def grad(self, beta: float) -> Tensor:
        if self.grad_q is None:
            return self.grad_p
        return (1.0 - beta) * self.grad_q + beta * self.grad_p

    def where(self, moved: Tensor, other: Point) -> Point:
        """``other`` at the chains where ``moved`` (C, B), this Point elsewhere."""
        grads = [None if a is None else torch.where(moved[..., None], b, a)
                 for a, b in ((self.grad_q, other.grad_q), (self.grad_p, other.grad_p))]
        return Point(torch.where(moved[..., None], other.u, self.u),
                     torch.where(moved, other.log_q, self.log_q),
                     torch.where(moved, other.log_p, self.log_p), *grads, other.beta)


def fixed_distribution(guide, space: LatentSpace, x: Tensor, idx: Tensor):
    """q(u) of a guide whose density over the unconstrained latents does not change
    during AIS, computed once per chunk (the guide's networks then run once, not at
    every gradient), or None when it must be read from the guide's trace each time.

    A local guide of this library gives it as ``joint_distribution``; an encoder with
    ``distribution(x)`` gives it when the model has a single real latent site.
    """
    with torch.no_grad():
        joint = getattr(guide, "joint_distribution", None)
        if callable(joint):
            return joint(x, idx)
        site = space.sites[0]
        single_real = len(space.sites) == 1 and site.is_real and len(site.event_shape) == 1
        if not (single_real and callable(getattr(guide, "distribution", None))):
            return None
        q = guide.distribution(x)
    if tuple(q.batch_shape) != (len(x),) or tuple(q.event_shape) != (space.dim,):
        return None
    return q


def hmc_transition(target: Target, start: Point, beta: float, eps: Tensor,
                   leapfrog_steps: int, noise: Noise) -> tuple[Point, Tensor]:
    """One HMC transition at ``beta`` for every chain and row: (the Point it ends at,
    acceptance prob). ``start``'s gradient is reused where it serves this beta."""
    if not start.has_grad(beta):
        start = target.point(start.u, beta)
    step = eps[:, None]  # [B, 1] broadcasts over chains and dims
    momentum = noise.normal(start.u.shape)
    h0 = -start.log_f(beta) + 0.5 * momentum.square().sum(-1)
    here, p = start, momentum + 0.5 * step * start.grad(beta)
    for i in range(leapfrog_steps):
        here = target.point(here.u + step * p, beta)
        p = p + (step if i < leapfrog_steps - 1 else 0.5 * step) * here.grad(beta)
    h1 = -here.log_f(beta) + 0.5 * p.square().sum(-1)
    accept_prob = torch.exp(torch.clamp(h0 - h1, max=0.0)).nan_to_num(0.0)
    accepted = noise.uniform(accept_prob.shape) < accept_prob
    return start.where(accepted, here), accept_prob


class Noise:
    """Momenta and uniforms drawn block by block from generators seeded by (seed, block),
    so a row's chains do not depend on which other rows share its chunk.

    Each block's draws have the shape of its padded batch (``ROW_BLOCK`` slots), and
    only its real slots are kept: the chunk's arithmetic runs on its real rows alone
    (``x``/``idx`` are the padded rows of the chunk, block after block).
    """

    def __init__(self, chunk: list[Block], seed: int, chains: int, x: Tensor, idx: Tensor):
        self.chunk, self.seed, self.chains = chunk, seed, chains
        self.x, self.idx = x, idx
        self.generators = [block_generator(seed, b.number, 1, device=x.device)
                           for b in chunk]
        self.options = {"device": x.device, "dtype": x.dtype}
        # Per block: None when every slot is real, else the real slots' mask.
        self.kept = [None if bool(b.real.all()) else b.real.to(x.device) for b in chunk]

    def initial(self, target: Target) -> Tensor:
        """Initial draws, block by block under the global generator seeded per block."""
        width = len(self.chunk[0].rows)
        pieces = []
        for i, block in enumerate(self.chunk):
            seed_torch(self.seed, block.number, 0)
            sub = Target(target.model, target.guide, target.space,
                         self.x[i * width : (i + 1) * width],
                         self.idx[i * width : (i + 1) * width], target.num_data)
            pieces.append(self._real(sub.initial(self.chains), i))
        return torch.cat(pieces, 1)

    def normal(self, shape) -> Tensor:
        return self._draw(torch.randn, shape)

    def uniform(self, shape) -> Tensor:
        return self._draw(torch.rand, shape)

    def _draw(self, draw, shape) -> Tensor:
        per_block = (shape[0], len(self.chunk[0].rows), *shape[2:])
        return torch.cat([self._real(draw(per_block, generator=g, **self.options), i)
                          for i, g in enumerate(self.generators)], 1)

    def _real(self, values: Tensor, block: int) -> Tensor:
        kept = self.kept[block]
        return values if kept is None else values[:, kept]
