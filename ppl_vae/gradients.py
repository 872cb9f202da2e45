"""Lower-variance gradient estimators: sticking the landing (STL) and DReG.

Both keep the objective and its value, and change only the estimate of its gradient
with respect to the parameters that the guide's samples depend on:

- :class:`StickingTheLanding` (Roeder, Wu & Duvenaud, 2017) for the ELBO. The
  reparameterized gradient of ``log p(x, z) - log q(z; phi)`` with z = z(eps; phi) has
  two parts: the path through z, and the score ``-d log q(z; phi) / d phi`` at fixed z,
  whose expectation under q is zero. STL drops the score: log q is evaluated with its
  parameters stopped. Where q equals the posterior, log p(x, z) - log q(z) is constant
  in z, so the STL gradient of the guide is exactly zero for every draw.
- :class:`DReG` (Tucker, Lawson, Gu & Maddison, 2018) for the IWAE bound. Per
  datapoint, with normalized weights w~_k, the guide's gradient is
  ``sum_k w~_k^2 d log w_k / d z_k  d z_k / d phi`` (log q's parameters stopped), an
  unbiased estimate of the IWAE gradient whose signal-to-noise ratio does not vanish as
  K grows; the model's gradient stays the usual ``sum_k w~_k grad_theta log p(x, z_k)``.

Stopping the parameters inside log q works for any guide module: the guide is run a
second time, replayed at the values it drew (which keep their path to the parameters),
with every parameter of model and guide replaced by a detached copy
(``torch.nn.utils.stateless``). Every site's log-density is then that of the value the
guide handed the model, whatever the guide computes in between (an auxiliary joint draw
with Delta sites carrying its log-Jacobian, a normalizing flow inverted at z). The
sums of site log-densities are those of :class:`ppl_vae.objectives.IWAE`, so the loss
values equal those of the standard estimators, and the loss traces under ``fit(jit=True)``.
"""

from __future__ import annotations

import contextlib
import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from ppl_vae.objectives import (
    DifferentiableELBO,
    _subsample_scale,
    _weighted_log_density,
)
from ppl_vae.validation import one_of

GRADIENTS = ("reparam", "stl", "dreg")
# The objective each estimator is a gradient of.
OBJECTIVE_OF = {"stl": "elbo", "dreg": "iwae"}


@contextlib.contextmanager
def stopped(*modules: nn.Module):
    """Every parameter of ``modules`` replaced by a detached copy within the block.

    Values are the same tensors' data, so densities are unchanged; only the gradient
    through the parameters is cut. Nested under ``TracedLoss``'s own reparametrization,
    the copies detach the traced inputs.
    """
    with contextlib.ExitStack() as stack:
        for module in modules:
            detached = {name: p.detach() for name, p in module.named_parameters()}
            stack.enter_context(_reparametrize_module(module, detached))
        yield


def _particles_trace(fn, num_particles: int, args, kwargs, trace=None):
    """Trace of ``fn`` (replayed at ``trace`` when given) under the particles plate."""
    with pyro.plate("particles", num_particles, dim=-2):
        fn = fn if trace is None else poutine.replay(fn, trace=trace)
        return poutine.trace(fn).get_trace(*args, **kwargs)


def _detached_values(trace):
    """A copy of ``trace`` whose sample values are cut from the graph."""
    copy = poutine.Trace()
    for name, site in trace.nodes.items():
        value = site.get("value")
        copy.add_node(name, **{**site, "value": value.detach()
                               if isinstance(value, Tensor) else value})
    return copy


def _stopped_log_q(model, guide, guide_trace, num_particles, args, kwargs, scale) -> Tensor:
    """log q of the guide's own draws with every parameter stopped, shape (K, B).

    The values keep their path to the parameters, so the gradient through z remains.
    The densities are computed inside the block: a distribution may read parameters
    only when scored (a conditional flow calls its networks in ``log_prob``).
    """
    with stopped(model, guide):
        q_trace = _particles_trace(guide, num_particles, args, kwargs, guide_trace)
        return _weighted_log_density(q_trace, scale)


class StickingTheLanding(DifferentiableELBO):
    """The ELBO with ``num_particles`` samples, guide gradient by sticking the landing.

    The loss is ``-(1/K) sum_k [log p(x, z_k) - log q(z_k)]`` summed over the
    minibatch and scaled by ``num_data / batch`` (the value of Pyro's ``Trace_ELBO``),
    with log q's parameters stopped. Site scales (a KL warm-up weight) are kept.

    Parameters
    ----------
    num_particles : int
        K, the samples per datapoint, drawn at once under the particles plate.
    """

    def __init__(self, num_particles: int = 1):
        super().__init__(num_particles=num_particles, max_plate_nesting=1)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """Minus the ELBO, scaled to the whole dataset, with the STL gradient."""
        k = self.num_particles
        guide_trace = _particles_trace(guide, k, args, kwargs)
        model_trace = _particles_trace(model, k, args, kwargs, guide_trace)
        scale = _subsample_scale(model_trace)
        log_q = _stopped_log_q(model, guide, guide_trace, k, args, kwargs, scale)
        log_w = _weighted_log_density(model_trace, scale) - log_q
        return -log_w.sum() * scale / k


class DReG(DifferentiableELBO):
    """The IWAE bound with ``num_particles`` samples and doubly reparameterized
    gradients.

    The value is that of :class:`ppl_vae.objectives.IWAE` (minus the bound, summed over
    the minibatch, scaled by ``num_data / batch``); its gradient is the surrogate

        sum_b [ sum_k w~_bk   log p(x_b, stop(z_bk); theta)
              + sum_k w~_bk^2 (log p(x_b, z_bk; stop(theta)) - log q(z_bk; stop(phi))) ]

    with the weights w~ normalized per datapoint and held constant. It costs one more
    pass of the model and of the guide than IWAE (the model at stopped latents for its
    own gradient, at stopped parameters for the guide's; the guide at stopped
    parameters for log q).

    Parameters
    ----------
    num_particles : int
        K, the samples per datapoint.
    """

    def __init__(self, num_particles: int = 5):
        super().__init__(num_particles=num_particles, max_plate_nesting=1)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """Minus the IWAE bound, scaled to the whole dataset, with the DReG gradient."""
        k = self.num_particles
        guide_trace = _particles_trace(guide, k, args, kwargs)
        # The model twice: at stopped z for its own gradient, at stopped parameters for
        # the guide's (through z). Both have the same values.
        at_stopped_z = _particles_trace(model, k, args, kwargs, _detached_values(guide_trace))
        scale = _subsample_scale(at_stopped_z)
        with stopped(model, guide):
            at_stopped_theta = _particles_trace(model, k, args, kwargs, guide_trace)
            log_p = _weighted_log_density(at_stopped_theta, scale)
        log_q = _stopped_log_q(model, guide, guide_trace, k, args, kwargs, scale)
        log_w = log_p - log_q
        weights = torch.softmax(log_w.detach(), dim=0)
        surrogate = (weights * _weighted_log_density(at_stopped_z, scale)
                     + weights.square() * log_w)
        bound = torch.logsumexp(log_w.detach(), dim=0) - math.log(k)
        surrogate = surrogate.sum()
        # The value of the bound, the gradient of the surrogate.
        return -(bound.sum() + surrogate - surrogate.detach()) * scale


def estimator(gradient: str, num_particles: int) -> DifferentiableELBO:
    """The loss of ``gradient`` ("stl" or "dreg") with ``num_particles`` samples."""
    if gradient == "stl":
        return StickingTheLanding(num_particles)
    return DReG(num_particles)


def check_gradient(gradient: str, *, objective: str, custom_loss: bool,
                   kl_warmup: int | None, flags: bool = False) -> str:
    """Refuse a ``gradient`` that is unknown or does not fit the other options.

    Parameters
    ----------
    gradient : {"reparam", "stl", "dreg"}
    objective : str
        fit's ``objective``; STL is a gradient of the ELBO, DReG of the IWAE bound.
    custom_loss : bool
        Whether fit got a ``loss=``: the estimators build their own loss.
    kl_warmup : int or None
        DReG's weights w~^2 hold for the IWAE bound itself; with the latent terms
        weighted by beta < 1 they would be (1 - beta) w~ + beta w~^2, so it is refused.
    flags : bool
        Name the options as command-line flags (``--gradient stl``) in messages.
    """
    def shown(name, value):
        return f"--{name.replace('_', '-')} {value}" if flags else f"{name}={value!r}"

    one_of(gradient, GRADIENTS, "--gradient" if flags else "gradient")
    if gradient == "reparam":
        return gradient
    if custom_loss:
        raise ValueError(f"{shown('gradient', gradient)} builds its own loss; it cannot be "
                         "combined with loss= (give objective= instead)")
    if objective != OBJECTIVE_OF[gradient]:
        raise ValueError(f"{shown('gradient', gradient)} is an estimator for "
                         f"{shown('objective', OBJECTIVE_OF[gradient])}, got "
                         f"{shown('objective', objective)}")
    if gradient == "dreg" and kl_warmup is not None:
        raise ValueError(f"{shown('gradient', gradient)} is derived for the IWAE bound "
                         "itself, not for latent terms weighted by a KL warm-up; got "
                         f"{shown('kl_warmup', kl_warmup)}")
    return gradient


def check_reparameterized(gradient: str, model, guide, x: Tensor, idx: Tensor,
                          num_data: int) -> None:
    """Refuse a guide the estimator cannot differentiate through, before any work.

    Model and guide must be modules (their parameters are stopped inside log q), and
    every latent site of the guide must have ``rsample`` and a density (a point mass
    carried by no auxiliary draw has none, so no score term to drop).
    """
    for name, module in (("model", model), ("guide", guide)):
        if not isinstance(module, nn.Module):
            raise ValueError(f"gradient={gradient!r} needs the {name} to be a torch "
                             f"module (PyroModule), got {type(module).__name__}")
    with torch.no_grad(), pyro.validation_enabled(False):
        trace = poutine.trace(guide).get_trace(x, idx, num_data)
    auxiliary = any(site["type"] == "sample" and site["infer"].get("is_auxiliary")
                    for site in trace.nodes.values())
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if not site["fn"].has_rsample:
            raise ValueError(f"gradient={gradient!r} needs reparameterized guide sites; "
                             f"site {name!r} ({type(site['fn']).__name__}) has no rsample")
        if not auxiliary and is_point_mass(site["fn"]):
            raise ValueError(f"gradient={gradient!r} needs a guide with a density; site "
                             f"{name!r} is a point mass (Delta)")


def is_point_mass(fn) -> bool:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)
