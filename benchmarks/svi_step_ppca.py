"""Seconds per SVI step of ppl_vae.fit() on PPCA(d=64, k=8), batch 128, against the same
single-sample ELBO written as a plain PyTorch loop, in the same process.

    python benchmarks/svi_step_ppca.py [--steps 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math

import torch

import ppl_vae
from benchmarks.timing import median_step_seconds, row, timed_steps
from guides import LinearEncoder
from models import PPCA

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
    batches = iter(torch.randperm(N).split(BATCH) * (steps // (N // BATCH) + 2))

    def step():
        idx = next(batches)
        xb = x[idx]
        opt.zero_grad()
        eps = torch.randn(len(xb), K)
        z = enc(xb) + log_scale.exp() * eps
        resid = (xb - z @ W.T - mu) / log_sigma.exp()
        log_lik = -0.5 * (resid.square() + LOG_2PI).sum(-1) - D * log_sigma
        log_prior = -0.5 * (z.square() + LOG_2PI).sum(-1)
        log_q = -0.5 * (eps.square() + LOG_2PI).sum(-1) - log_scale.sum()
        loss = -(N / len(xb)) * (log_lik + log_prior - log_q).sum()
        loss.item()
        loss.backward()
        opt.step()

    return timed_steps(step, steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(N, D) @ torch.randn(D, D) / math.sqrt(D)
    pyro_med, pyro_best = median_step_seconds(lambda: pyro_run(x, args.steps), args.repeats)
    plain_med, plain_best = median_step_seconds(lambda: plain_run(x, args.steps), args.repeats)
    print(f"PPCA(d={D}, k={K}), batch {BATCH}, {args.steps} steps x {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    print(row("route", "median ms/step", "best ms/step"))
    print(row("---", "---", "---"))
    print(row("ppl_vae.fit (Pyro Trace_ELBO)", f"{1e3 * pyro_med:.3f}", f"{1e3 * pyro_best:.3f}"))
    print(row("plain PyTorch loop", f"{1e3 * plain_med:.3f}", f"{1e3 * plain_best:.3f}"))
    print(f"ratio (median): {pyro_med / plain_med:.2f}x, extra {1e3 * (pyro_med - plain_med):.3f} "
          f"ms/step; ratio (best): {pyro_best / plain_best:.2f}x")


if __name__ == "__main__":
    main()
