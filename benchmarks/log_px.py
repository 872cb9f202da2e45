"""Speed of ppl_vae.log_marginal, against a plain PyTorch IWAE and Pyro's Importance.

1. VAE(784, 50, hidden=(200, 200)) + MLPEncoder, K=1000 samples on 100 datapoints:
   ``ppl_vae.log_marginal`` against a plain PyTorch IWAE estimate of the same quantity
   that evaluates all K samples in one go.
2. The physical limit: the decoder's matrix-multiply FLOPs divided by this machine's
   single-precision GEMM rate, measured here.
3. PPCA(64, 8), K=1000 on 100 datapoints: against ``pyro.infer.Importance`` (which
   draws the K samples one trace at a time, and weighs the whole batch jointly).

    python -m benchmarks.log_px [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import Importance

import ppl_vae
from benchmarks.timing import row
from ppl_vae.guides import LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE

D, LATENT, HIDDEN, N, K = 784, 50, (200, 200), 100, 1000
LOG_2PI = math.log(2 * math.pi)


@torch.no_grad()
def plain_iwae(model, guide, x, k):
    """log p(x) per datapoint, all K samples at once, written by hand."""
    q = guide.distribution(x).base_dist
    eps = torch.randn(k, *q.loc.shape)
    z = q.loc + q.scale * eps
    logits = model.decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                  reduction="none").sum(-1)
    log_prior = -0.5 * (z.square() + LOG_2PI).sum(-1)
    log_q = (-0.5 * (eps.square() + LOG_2PI) - q.scale.log()).sum(-1)
    return torch.logsumexp(log_lik + log_prior - log_q, 0) - math.log(k)


def seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def gemm_flops_per_second(size=2048, repeats=5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(seconds(lambda: a @ b, 1)[0] for _ in range(repeats))
    return 2 * size**3 / best


def decoder_flops(k, n) -> float:
    widths = [LATENT, *HIDDEN, D]
    return 2 * k * n * sum(a * b for a, b in zip(widths, widths[1:], strict=False))


def vae_section(repeats):
    torch.manual_seed(0)
    model, guide = VAE(D, LATENT, hidden=HIDDEN), MLPEncoder(D, LATENT, hidden=HIDDEN)
    x = (torch.rand(N, D) < 0.15).float()
    t_ours, t_plain = [], []
    for _ in range(repeats):  # alternate, so that machine noise hits both alike
        t_ours.append(seconds(lambda: ppl_vae.log_marginal(model, guide, x, K), 1)[0])
        t_plain.append(seconds(lambda: plain_iwae(model, guide, x, K), 1)[0])
    ours = ppl_vae.log_marginal(model, guide, x, K, seed=1).mean()
    plain = plain_iwae(model, guide, x, K).mean()
    bound = decoder_flops(K, N) / gemm_flops_per_second()
    return t_ours, t_plain, bound, float(ours), float(plain)


def ppca_section(repeats):
    torch.manual_seed(0)
    model, guide = PPCA(64, 8), LinearEncoder(64, 8)
    x = model(None, num_data=N).detach()

    def builtin():
        posterior = Importance(model, guide, num_samples=K).run(x)
        return posterior.get_log_normalizer()

    t_builtin = seconds(builtin, max(1, repeats // 2))[0]
    t_ours = seconds(lambda: ppl_vae.log_marginal(model, guide, x, K), repeats)[0]
    return t_ours, t_builtin


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    pyro.settings.set(module_local_params=True)
    t_ours, t_plain, bound, ours, plain = vae_section(args.repeats)
    ratios = [a / b for a, b in zip(t_ours, t_plain, strict=True)]
    med_ours, med_plain = statistics.median(t_ours), statistics.median(t_plain)
    print(f"log p(x), VAE(784, 50, (200, 200)), K={K}, N={N}, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating repeats")
    print(row("route", "median s", "best s", "mean log p(x)"))
    print(row("---", "---", "---", "---"))
    print(row("ppl_vae.log_marginal", f"{med_ours:.3f}", f"{min(t_ours):.3f}", f"{ours:.2f}"))
    print(row("plain PyTorch IWAE, all K at once", f"{med_plain:.3f}", f"{min(t_plain):.3f}",
              f"{plain:.2f}"))
    print(f"ratio ours/plain: median {statistics.median(ratios):.2f}x, "
          f"best {min(t_ours) / min(t_plain):.2f}x")
    print(f"GEMM bound for the decoder: {bound:.3f} s; ours / bound = {min(t_ours) / bound:.2f}x")
    t_ours_ppca, t_builtin = ppca_section(args.repeats)
    print(f"\nPPCA(64, 8), K={K}, N={N}: ppl_vae.log_marginal {t_ours_ppca:.4f} s, "
          f"pyro.infer.Importance {t_builtin:.2f} s: {t_builtin / t_ours_ppca:.0f}x faster")


if __name__ == "__main__":
    main()
