"""Seconds per SVI step of ppl_vae.fit() on VAE(784, 50, hidden=(200, 200)) + MLPEncoder,
batch 100, against the same model and single-sample reparameterized ELBO written as a
plain PyTorch training loop (same architecture, same optimizer), in the same process.

    python -m benchmarks.svi_step_vae [--steps 300] [--repeats 7]

Runs alternate (Pyro, plain, Pyro, ...) so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

import ppl_vae
from benchmarks.timing import (
    compare_step_times,
    plain_training_step,
    print_step_table,
    timed_steps,
)
from ppl_vae.guides import MLPEncoder
from ppl_vae.models import VAE
from ppl_vae.models.blocks import MLP

D, K, N, BATCH, HIDDEN = 784, 50, 10000, 100, (200, 200)
LOG_2PI = math.log(2 * math.pi)


def pyro_run(x: torch.Tensor, steps: int) -> np.ndarray:
    model, guide = VAE(D, K, hidden=HIDDEN), MLPEncoder(D, K, hidden=HIDDEN)
    result = ppl_vae.fit(model, guide, x, num_steps=steps, batch_size=BATCH, lr=1e-3,
                         progress=False)
    return result.step_seconds


def plain_run(x: torch.Tensor, steps: int) -> np.ndarray:
    """The reference: the same networks and estimator, by hand."""
    encoder = MLP(D, K, K, hidden=HIDDEN)
    decoder = MLP(K, D, hidden=HIDDEN)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    order = torch.cat([torch.randperm(N) for _ in range(steps * BATCH // N + 1)])
    batches = iter(order.split(BATCH))

    def loss():
        xb = x[next(batches)]
        loc, raw = encoder(xb)
        scale = F.softplus(raw) + 1e-4
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_lik = -F.binary_cross_entropy_with_logits(decoder(z), xb, reduction="none").sum(-1)
        log_prior = -0.5 * (z.square() + LOG_2PI).sum(-1)
        log_q = (-0.5 * (eps.square() + LOG_2PI) - scale.log()).sum(-1)
        return -(N / len(xb)) * (log_lik + log_prior - log_q).sum()

    return timed_steps(plain_training_step(opt, loss), steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = (torch.rand(N, D) < 0.15).float()
    pyro_times, plain_times = compare_step_times(
        lambda: pyro_run(x, args.steps), lambda: plain_run(x, args.steps), args.repeats
    )
    print_step_table(f"VAE(784, 50, hidden=(200, 200)) + MLPEncoder, batch {BATCH}, "
                     f"{args.steps} steps", pyro_times, plain_times)


if __name__ == "__main__":
    main()
