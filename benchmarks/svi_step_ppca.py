"""Seconds per SVI step of ppl_vae.fit() on PPCA(d=64, k=8), batch 128, against the same
single-sample ELBO written as a plain PyTorch loop, in the same process.

    python benchmarks/svi_step_ppca.py [--steps 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math

import torch

import ppl_vae
from benchmarks.timing import (
    compare_step_times,
    plain_training_step,
    print_step_table,
    timed_steps,
)
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA

D, K, N, BATCH = 64, 8, 5000, 128
LOG_2PI = math.log(2 * math.pi)


def pyro_run(x: torch.Tensor, steps: int):
    model, guide = PPCA(D, K), LinearEncoder(D, K)
    return ppl_vae.fit(model, guide, x, num_steps=steps, batch_size=BATCH, lr=1e-2,
                       progress=False).step_seconds


def plain_run(x: torch.Tensor, steps: int):
    """The same model, encoder and estimator, by hand: the reference for speed."""
    W = torch.nn.Parameter(0.1 * torch.randn(D, K))
    mu = torch.nn.Parameter(torch.zeros(D))
    log_sigma = torch.nn.Parameter(torch.zeros(()))
    enc = torch.nn.Linear(D, K)
    log_scale = torch.nn.Parameter(torch.zeros(K))
    params = [W, mu, log_sigma, log_scale, *enc.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    order = torch.cat([torch.randperm(N) for _ in range(steps * BATCH // N + 1)])
    batches = iter(order.split(BATCH))

    def loss():
        xb = x[next(batches)]
        eps = torch.randn(len(xb), K)
        z = enc(xb) + log_scale.exp() * eps
        resid = (xb - z @ W.T - mu) / log_sigma.exp()
        log_lik = -0.5 * (resid.square() + LOG_2PI).sum(-1) - D * log_sigma
        log_prior = -0.5 * (z.square() + LOG_2PI).sum(-1)
        log_q = -0.5 * (eps.square() + LOG_2PI).sum(-1) - log_scale.sum()
        return -(N / len(xb)) * (log_lik + log_prior - log_q).sum()

    return timed_steps(plain_training_step(opt, loss), steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(N, D) @ torch.randn(D, D) / math.sqrt(D)
    pyro_times, plain_times = compare_step_times(
        lambda: pyro_run(x, args.steps), lambda: plain_run(x, args.steps), args.repeats
    )
    print_step_table(f"PPCA(d={D}, k={K}), batch {BATCH}, {args.steps} steps", pyro_times,
                     plain_times)


if __name__ == "__main__":
    main()
