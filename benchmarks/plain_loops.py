"""The library's hot paths written as plain PyTorch: the references of ``benchmarks.speed``.

Each function does the work of one library call with plain torch ops on the same
network weights (no Pyro: no trace, no plate, no distribution objects), so that the
ratio library / plain measures what the library's machinery costs. They are also
checked against the library's numbers in ``tests/benchmarks/test_speed.py``.

Conventions: a VAE decoder is the library's ``MLP`` (a plain ``nn.Module``) mapping z
(..., k) to Bernoulli logits (..., D); an encoder ``MLP`` maps x to (loc, raw scale)
with scale = softplus(raw) + 1e-4, the library's ``SCALE_FLOOR``.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

ais_settings = importlib.import_module("ppl_vae.ais")  # the module, not ppl_vae.ais()

LOG_2PI = math.log(2 * math.pi)
SCALE_FLOOR = 1e-4
# ais()'s settings (the same work, whatever they are): pilot chains, the step-size
# rule's gain and range, the sigmoid schedule's delta.
PILOT_CHAINS, ADAPT_GAIN, STEP_RANGE = ais_settings.PILOT_CHAINS, ais_settings.ADAPT_GAIN, \
    ais_settings.STEP_SIZE_RANGE
SIGMOID_DELTA = ais_settings.SIGMOID_DELTA


def log_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


def bernoulli_log_lik(logits: Tensor, x: Tensor) -> Tensor:
    """log Bernoulli(x; logits) summed over the last dim; x broadcasts over leading dims."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                               reduction="none").sum(-1)


def gaussian_encoder(encoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """(loc, scale) of a diagonal Gaussian MLP encoder, each (N, k)."""
    loc, raw = encoder(x)
    return loc, F.softplus(raw) + SCALE_FLOOR


# ------------------------------------------------------------------------ fit steps


def training_step(opt: torch.optim.Optimizer, loss_fn):
    """One step of a hand-written loop doing what ``fit`` does per step."""

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.item()  # fit reads the loss every step (history, NaN check)
        loss.backward()
        opt.step()

    return step


def vae_elbo(encoder, decoder, x: Tensor, eps: Tensor) -> Tensor:
    """Single-sample reparameterized ELBO per datapoint (N,) of a Bernoulli VAE."""
    loc, scale = gaussian_encoder(encoder, x)
    z = loc + scale * eps
    log_q = (-0.5 * (eps.square() + LOG_2PI) - scale.log()).sum(-1)
    return bernoulli_log_lik(decoder(z), x) + log_normal(z) - log_q


def flow_elbo(encoder, couplings, decoder, x: Tensor, eps: Tensor) -> Tensor:
    """Single-sample ELBO per datapoint (N,) of a VAE with ``FlowEncoder``'s flow.

    ``encoder`` is the FlowEncoder's MLP (its last hidden layer h(x) is the context),
    ``couplings`` its ConditionalAffineCoupling modules, whose weights are read as
    plain tensors: the coupling network is concat(h, z_kept) -> Linear -> tanh ->
    Linear -> (shift, log scale), log scale clamped to [-5, 3] with Pyro's
    straight-through gradient; every second layer acts on the dims reversed.
    """
    *trunk, head = encoder.layers
    h = x
    for layer in trunk:
        h = layer(h)
    loc, raw = head(h).split(eps.shape[-1], dim=-1)
    scale = F.softplus(raw) + SCALE_FLOOR
    z = loc + scale * eps
    log_q = (-0.5 * (eps.square() + LOG_2PI) - scale.log()).sum(-1)
    for i, coupling in enumerate(couplings):
        z = z.flip(-1) if i % 2 else z
        z, log_det = _affine_coupling(coupling, z, h)
        z = z.flip(-1) if i % 2 else z
        log_q = log_q - log_det
    return bernoulli_log_lik(decoder(z), x) + log_normal(z) - log_q


def _affine_coupling(coupling, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
    kept = coupling.split_dim
    z1, z2 = z[..., :kept], z[..., kept:]
    first, last = coupling.nn.layers
    context = context.expand(*z1.shape[:-1], context.shape[-1])
    out = last(torch.tanh(first(torch.cat([context, z1], -1))))
    shift, log_scale = out[..., : z2.shape[-1]], out[..., z2.shape[-1] :]
    log_scale = log_scale + (log_scale.clamp(-5.0, 3.0) - log_scale).detach()
    return torch.cat([z1, log_scale.exp() * z2 + shift], -1), log_scale.sum(-1)


def ppca_elbo(W, mu, log_sigma, enc_weight, enc_bias, log_scale, x, eps) -> Tensor:
    """Single-sample ELBO per datapoint (N,) of PPCA with a linear diagonal encoder."""
    z = x @ enc_weight.T + enc_bias + log_scale.exp() * eps
    resid = (x - z @ W.T - mu) / log_sigma.exp()
    log_lik = -0.5 * (resid.square() + LOG_2PI).sum(-1) - x.shape[-1] * log_sigma
    log_q = -0.5 * (eps.square() + LOG_2PI).sum(-1) - log_scale.sum()
    return log_lik + log_normal(z) - log_q


# --------------------------------------------------------------------- log p(x) by IS


@torch.no_grad()
def vae_log_marginal(encoder, decoder, x: Tensor, k: int) -> Tensor:
    """IWAE log p(x) per datapoint (N,), all K samples of the encoder at once."""
    loc, scale = gaussian_encoder(encoder, x)
    eps = torch.randn(k, *loc.shape, device=loc.device)
    z = loc + scale * eps
    log_q = (-0.5 * (eps.square() + LOG_2PI) - scale.log()).sum(-1)
    log_w = bernoulli_log_lik(decoder(z), x) + log_normal(z) - log_q
    return torch.logsumexp(log_w, 0) - math.log(k)


@torch.no_grad()
def ppca_log_marginal(W, mu, sigma, enc_weight, enc_bias, scale, x, k: int) -> Tensor:
    """IS log p(x) per datapoint (N,) of PPCA with a linear diagonal encoder, all K at once."""
    eps = torch.randn(k, *x.shape[:-1], W.shape[1], dtype=x.dtype, device=x.device)
    z = x @ enc_weight.T + enc_bias + scale * eps
    resid = (x - z @ W.T - mu) / sigma
    log_lik = -0.5 * (resid.square() + LOG_2PI).sum(-1) - x.shape[-1] * sigma.log()
    log_q = (-0.5 * (eps.square() + LOG_2PI) - scale.log()).sum(-1)
    return torch.logsumexp(log_lik + log_normal(z) - log_q, 0) - math.log(k)


# ------------------------------------------------------------------------------ AIS


def sigmoid_betas(num_steps: int) -> list[float]:
    """Wu et al.'s sigmoid schedule sigma(4 (2t/T - 1)), rescaled to run from 0 to 1."""
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    s = torch.sigmoid(SIGMOID_DELTA * (2 * t - 1))
    return ((s - s[0]) / (s[-1] - s[0])).tolist()


def vae_ais(decoder, loc: Tensor, scale: Tensor, x: Tensor, num_steps: int, num_chains: int,
            *, leapfrog: int = 10, step_size: float = 0.05, target: float = 0.65,
            pilot: int = PILOT_CHAINS) -> Tensor:
    """log p(x) per datapoint (N,) by AIS from q = N(loc, scale^2) for a Bernoulli VAE.

    The arithmetic of ``ppl_vae.ais(model, x, proposal=encoder)`` written out: sigmoid
    schedule, HMC with ``leapfrog`` steps, one step size per datapoint steered by
    ``pilot`` extra chains toward ``target`` (their weights are dropped). Written as a
    plain loop is: every transition evaluates its start again, where the library hands
    on the densities and gradients that the last transition ended at.
    """
    chains = num_chains + pilot
    z = loc + scale * torch.randn(chains, *loc.shape, device=loc.device)
    betas = sigmoid_betas(num_steps)

    def parts(z):
        log_q = (-0.5 * ((z - loc) / scale).square() - scale.log()).sum(-1) \
            - 0.5 * z.shape[-1] * LOG_2PI
        return log_q, log_normal(z) + bernoulli_log_lik(decoder(z), x)

    eps = torch.full((len(x), 1), step_size, device=x.device)
    log_w = torch.zeros(chains, len(x), device=x.device)
    for t in range(1, num_steps + 1):
        with torch.no_grad():
            log_q, log_p = parts(z)
        log_w += (betas[t] - betas[t - 1]) * (log_p - log_q)
        if t == num_steps:
            break
        z, accept = hmc(parts, z, betas[t], eps, leapfrog)
        pilot_accept = accept[num_chains:].mean(0)
        eps = (eps * torch.exp(ADAPT_GAIN * (pilot_accept - target))[:, None]).clamp(*STEP_RANGE)
    return torch.logsumexp(log_w[:num_chains], 0) - math.log(num_chains)


def hmc(parts, z: Tensor, beta: float, eps: Tensor, leapfrog: int) -> tuple[Tensor, Tensor]:
    """One HMC transition on log f = (1 - beta) log q + beta log p: (new z, accept prob).

    ``parts(z)`` gives (log q, log p), each (C, N); ``eps`` broadcasts against z's
    last two dims: (N, 1) for a step size per datapoint, or a scalar tensor.
    """

    def log_f_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_q, log_p = parts(z)
            log_f = (1 - beta) * log_q + beta * log_p
            return log_f.detach(), torch.autograd.grad(log_f.sum(), z)[0]

    p0 = torch.randn_like(z)
    log_f0, g = log_f_and_grad(z)
    position, p = z, p0 + 0.5 * eps * g
    for i in range(leapfrog):
        position = position + eps * p
        log_f1, g = log_f_and_grad(position)
        p = p + (eps if i < leapfrog - 1 else 0.5 * eps) * g
    h0 = -log_f0 + 0.5 * p0.square().sum(-1)
    h1 = -log_f1 + 0.5 * p.square().sum(-1)
    accept = torch.exp(torch.clamp(h0 - h1, max=0.0)).nan_to_num(0.0)
    moved = (torch.rand_like(accept) < accept)[..., None]
    return torch.where(moved, position, z), accept


# ------------------------------------------------------------------- local fits


def local_diag_elbo(decoder, x: Tensor, loc: Tensor, log_scale: Tensor, eps: Tensor) -> Tensor:
    """ELBO per particle and datapoint (S, N) of q_n = N(loc_n, exp(log_scale_n)^2)."""
    z = loc + log_scale.exp() * eps
    log_q = (-0.5 * (eps.square() + LOG_2PI) - log_scale).sum(-1)
    return bernoulli_log_lik(decoder(z), x) + log_normal(z) - log_q


def local_flow_sample(params: dict, eps: Tensor) -> tuple[Tensor, Tensor]:
    """u (S, N, d) and log q_n(u) (S, N) of ``LocalFlow`` from base noise eps (S, N, d).

    ``params`` holds its tensors by name (``loc``, ``log_diag``, ``off_diag``,
    ``skew``, ``log_tail`` and per layer j ``w_in.j``, ``b_in.j``, ``w_out.j``,
    ``b_out.j``), read as plain tensors: sinh-arcsinh then affine coupling per layer,
    then u = m + L y.
    """
    y, log_q = eps, (-0.5 * (eps.square() + LOG_2PI)).sum(-1)
    d, layers = eps.shape[-1], params["skew"].shape[1]
    for j in range(layers):
        tail = (3.0 * torch.tanh(params["log_tail"][:, j] / 3.0)).exp()
        a = tail * torch.asinh(y) - params["skew"][:, j]
        log_cosh = a.abs() + torch.log1p(torch.exp(-2 * a.abs())) - math.log(2)
        log_q = log_q - (tail.log() + log_cosh - torch.hypot(torch.ones_like(y), y).log()).sum(-1)
        y = torch.sinh(a)
        kept = d // 2 if j % 2 == 0 else d - d // 2
        first = j % 2 == 0
        y_kept, y_moved = (y[..., :kept], y[..., kept:]) if first else \
            (y[..., d - kept :], y[..., : d - kept])
        h = torch.tanh(torch.einsum("sbi,bih->sbh", y_kept, params[f"w_in.{j}"])
                       + params[f"b_in.{j}"])
        out = torch.einsum("sbh,bho->sbo", h, params[f"w_out.{j}"]) + params[f"b_out.{j}"]
        raw, shift = out.chunk(2, -1)
        log_s = 3.0 * torch.tanh(raw / 3.0)
        y_moved = y_moved * log_s.exp() + shift
        log_q = log_q - log_s.sum(-1)
        y = torch.cat((y_kept, y_moved) if first else (y_moved, y_kept), -1)
    tril = _tril(params["log_diag"], params["off_diag"])
    u = (tril @ y.unsqueeze(-1)).squeeze(-1) + params["loc"]
    return u, log_q - params["log_diag"].sum(-1)


def _tril(log_diag: Tensor, off_diag: Tensor) -> Tensor:
    d = log_diag.shape[-1]
    rows, cols = torch.tril_indices(d, d, offset=-1)
    tril = torch.diag_embed(log_diag.exp())
    tril[..., rows, cols] = off_diag
    return tril


def local_flow_elbo(decoder, x: Tensor, params: dict, eps: Tensor) -> Tensor:
    """ELBO per particle and datapoint (S, N) of the per-datapoint flow."""
    u, log_q = local_flow_sample(params, eps)
    return bernoulli_log_lik(decoder(u), x) + log_normal(u) - log_q


def local_fit(elbo_fn, params: list[Tensor], x: Tensor, latent_dim: int, *, steps: int,
              particles: int, lr: float) -> list[float]:
    """Adam on per-datapoint parameters, all rows at once: ``steps`` steps of ``particles``
    samples per datapoint; ``elbo_fn(eps)`` gives the ELBO (S, N). Returns the mean
    ELBO per datapoint of each step."""
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        eps = torch.randn(particles, len(x), latent_dim, device=x.device)
        loss = -elbo_fn(eps).mean(0).sum()
        history.append(-loss.item() / len(x))
        loss.backward()
        opt.step()
    return history
