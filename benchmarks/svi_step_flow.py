"""Seconds per SVI step of ppl_vae.fit() on VAE(784, 50, hidden=(200, 200)) + FlowEncoder
(two conditional affine coupling layers), batch 100, against the same flow VAE written as
a plain PyTorch loop that uses the same Pyro transforms (no Pyro trace, plain Adam), in
the same process.

    python -m benchmarks.svi_step_flow [--steps 300] [--repeats 7] [--threads 1] [--json PATH]

Runs alternate (Pyro, plain, Pyro, ...) so that machine noise hits both alike. The data
are random binary images of MNIST's shape: the cost of a step does not depend on them.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

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
from ppl_vae.guides import FlowEncoder
from ppl_vae.guides.amortized import SCALE_FLOOR
from ppl_vae.json_output import dumps
from ppl_vae.models import VAE
from ppl_vae.models.blocks import MLP

D, K, N, BATCH, HIDDEN, FLOWS = 784, 50, 10000, 100, (200, 200), 2
LOG_2PI = math.log(2 * math.pi)


def pyro_run(x: torch.Tensor, steps: int) -> np.ndarray:
    model = VAE(D, K, hidden=HIDDEN)
    guide = FlowEncoder(D, K, hidden=HIDDEN, num_flows=FLOWS)
    result = ppl_vae.fit(model, guide, x, num_steps=steps, batch_size=BATCH, lr=1e-3,
                         progress=False)
    return result.step_seconds


def plain_run(x: torch.Tensor, steps: int) -> np.ndarray:
    """The reference: the same networks, transforms and estimator, by hand."""
    # The coupling layers are FlowEncoder's (the same Pyro ConditionalAffineCoupling
    # modules, started at the identity); everything around them is written out.
    couplings = FlowEncoder(D, K, hidden=HIDDEN, num_flows=FLOWS).flows
    encoder = MLP(D, K, K, hidden=HIDDEN)
    decoder = MLP(K, D, hidden=HIDDEN)
    params = [*encoder.parameters(), *couplings.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    reverse = torch.arange(K - 1, -1, -1)
    order = torch.cat([torch.randperm(N) for _ in range(steps * BATCH // N + 1)])
    batches = iter(order.split(BATCH))
    *trunk, head = encoder.layers

    def loss():
        xb = x[next(batches)]
        h = xb
        for layer in trunk:
            h = layer(h)
        loc, raw = head(h).split(K, dim=-1)
        scale = F.softplus(raw) + SCALE_FLOOR
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_q = (-0.5 * (eps.square() + LOG_2PI) - scale.log()).sum(-1)
        for i, coupling in enumerate(couplings):
            layer = coupling.condition(h)
            if i % 2:
                z = z[..., reverse]
            z_next = layer(z)
            log_q = log_q - layer.log_abs_det_jacobian(z, z_next)
            z = z_next[..., reverse] if i % 2 else z_next
        log_lik = -F.binary_cross_entropy_with_logits(decoder(z), xb, reduction="none").sum(-1)
        log_prior = -0.5 * (z.square() + LOG_2PI).sum(-1)
        return -(N / len(xb)) * (log_lik + log_prior - log_q).sum()

    return timed_steps(plain_training_step(opt, loss), steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=Path("runs/svi_step_flow.json"),
                        help="where to write the figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = (torch.rand(N, D) < 0.15).float()
    pyro_times, plain_times = compare_step_times(
        lambda: pyro_run(x, args.steps), lambda: plain_run(x, args.steps), args.repeats
    )
    print_step_table(f"VAE(784, 50, hidden=(200, 200)) + FlowEncoder({FLOWS} couplings), "
                     f"batch {BATCH}, {args.steps} steps", pyro_times, plain_times)
    ratios = [a / b for a, b in zip(pyro_times, plain_times, strict=True)]
    figures = {
        "benchmark": "svi_step_flow",
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "fit_ms": 1e3 * statistics.median(pyro_times),
        "plain_ms": 1e3 * statistics.median(plain_times),
        "ratio_median": statistics.median(ratios),
        "ratio_best": min(pyro_times) / min(plain_times),
        "fit_ms_per_repeat": [1e3 * t for t in pyro_times],
        "plain_ms_per_repeat": [1e3 * t for t in plain_times],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
