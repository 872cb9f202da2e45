"""AIS against importance sampling on the MNIST VAE, BDMC sandwiches, and AIS speed.

Uses the 200-epoch model of ``benchmarks/vae_mnist.py`` (``--checkpoint``) and a fixed
random subset of test points. Prints and writes (``--out``/ais_mnist.json):

1. log p(x) by AIS from the encoder at each ``--steps`` x ``--chains``, with adapted
   and with fixed step sizes side by side (a valid AIS estimate should not fall as the
   number of steps grows), and by importance sampling with K samples from the encoder
   and from fitted local (diagonal) guides;
2. BDMC on points simulated from the model: the sandwich upper - lower per step count;
3. seconds per datapoint of each;
4. ``ais()`` against the same AIS written as a plain PyTorch loop (same schedule,
   chains, leapfrog steps and pilot-chain adaptation), and the ratio of both to the
   GEMM bound (the leapfrog gradients' decoder FLOPs over the measured SGEMM rate).

    python -m benchmarks.ais_mnist --checkpoint runs/vae_mnist/epochs200.pt \\
        --data-root ../shared/data [--points 100 --steps 1000 5000 10000 --chains 16]

Each finished measurement is appended to the JSON, and a rerun skips it (resumable).
"""

from __future__ import annotations

import argparse
import importlib
import math
import time

import torch
import torch.nn.functional as F

import ppl_vae
from benchmarks.store import opened
from ppl_vae.cli import load_checkpoint
from ppl_vae.data import load_dataset

ais_module = importlib.import_module("ppl_vae.ais")
PILOT_CHAINS = 4  # ais()'s default


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    out, store = opened(args, "ais_mnist.json")
    model, encoder, _ = load_checkpoint(args.checkpoint)
    for p in (*model.parameters(), *encoder.parameters()):
        p.requires_grad_(False)
    x = load_dataset("binarized_mnist", "test", root=args.data_root, limit=args.points,
                     seed=args.seed)
    for steps in args.steps:
        for adapt in (True, False):
            key = f"ais/{steps}/{'adapt' if adapt else 'fixed'}"
            store.run(key, lambda s=steps, a=adapt: _ais(model, encoder, x, s, a, args))
    for k in args.is_samples:
        store.run(f"is/encoder/{k}", lambda k=k: _is(model, encoder, x, k, args.seed))
    xs, latents = ppl_vae.sample_from_model(model, args.points, seed=args.seed)
    for steps in args.bdmc_steps:
        store.run(f"bdmc/{steps}", lambda s=steps: _bdmc(model, encoder, xs, latents, s, args))
    if args.speed_points > 0:
        store.run("speed", lambda: _speed(model, encoder, x[: args.speed_points], args))
    for k in args.is_samples:
        store.run(f"is/local/{k}", lambda k=k: _is_local(model, encoder, x, k, args.seed))
    _print(store.results, args)


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/vae_mnist/epochs200.pt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--bdmc-steps", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--fixed-step-size", type=float, default=0.03)
    parser.add_argument("--is-samples", type=int, nargs="*", default=[5000])
    parser.add_argument("--speed-points", type=int, default=32)
    parser.add_argument("--speed-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ais_mnist")
    return parser


def _ais(model, encoder, x, steps, adapt, args) -> dict:
    result = ppl_vae.ais(model, x, proposal=encoder, num_steps=steps, num_chains=args.chains,
                         adapt=adapt, step_size=0.05 if adapt else args.fixed_step_size,
                         seed=args.seed, progress=False)
    return {**result.summary(), "per_point_seconds": result.seconds / len(x),
            "step_size": float(result.step_size.mean()),
            # per datapoint, for paired comparisons between step counts
            "per_point": result.log_marginal.tolist()}


def _is(model, guide, x, k, seed) -> dict:
    start = time.perf_counter()
    summary = ppl_vae.diagnostics(model, guide, x, k, seed=seed).summary()
    return {**summary, "per_point_seconds": (time.perf_counter() - start) / len(x)}


def _is_local(model, encoder, x, k, seed) -> dict:
    start = time.perf_counter()
    local = ppl_vae.fit_local(model, x, "diag", init_from=encoder, progress=False, seed=seed)
    summary = ppl_vae.diagnostics(model, local, x, k, seed=seed).summary()
    return {**summary, "per_point_seconds": (time.perf_counter() - start) / len(x)}


def _bdmc(model, encoder, xs, latents, steps, args) -> dict:
    result = ppl_vae.bdmc(model, xs, latents, proposal=encoder, num_steps=steps,
                          num_chains=args.chains, seed=args.seed, progress=False)
    return {**result.summary(), "per_point_seconds": (result.forward.seconds
                                                      + result.reverse.seconds) / len(xs),
            "per_point_gap": (result.upper - result.lower).tolist()}


# ------------------------------------------------------------------ the speed check


def _speed(model, encoder, x, args) -> dict:
    """Best of 3 alternating runs of ais() and of the plain loop, and the GEMM bound."""
    steps, chains = args.speed_steps, args.chains
    library, plain = [], []
    for repeat in range(3):
        start = time.perf_counter()
        ours = ppl_vae.ais(model, x, proposal=encoder, num_steps=steps, num_chains=chains,
                           seed=repeat, progress=False)
        library.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = plain_ais(model, encoder, x, steps, chains, seed=repeat)
        plain.append(time.perf_counter() - start)
    gemm = _gemm_seconds(model, x, steps, chains + PILOT_CHAINS)
    return {
        "points": len(x), "steps": steps, "chains": chains,
        "library_seconds": min(library), "plain_seconds": min(plain),
        "ratio": min(library) / min(plain), "gemm_bound_seconds": gemm,
        "library_over_gemm": min(library) / gemm, "plain_over_gemm": min(plain) / gemm,
        "library_log_px": float(ours.log_marginal.mean()),
        "plain_log_px": float(reference.mean()),
    }


def plain_ais(model, encoder, x, num_steps, num_chains, *, seed, pilot=PILOT_CHAINS, leapfrog=10,
              step_size=0.05, target=0.65, gain=0.05):
    """The same AIS as ais(model, x, proposal=encoder) for a Bernoulli VAE with a diagonal
    Gaussian encoder, in plain PyTorch: the reference for speed (and a check of values)."""
    torch.manual_seed(seed)
    decoder = model.decoder
    q = encoder.distribution(x)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    chains = num_chains + pilot
    z = loc + scale * torch.randn(chains, *loc.shape)
    betas = ais_module.schedule_betas("sigmoid", num_steps).tolist()

    def parts(z):
        log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log()).sum(-1) \
            - 0.5 * z.shape[-1] * math.log(2 * math.pi)
        log_prior = (-0.5 * z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
        log_lik = -F.binary_cross_entropy_with_logits(
            decoder(z), x.expand(z.shape[0], -1, -1), reduction="none").sum(-1)
        return log_q, log_prior + log_lik

    def grad(z, beta):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_q, log_p = parts(z)
            log_f = (1 - beta) * log_q + beta * log_p
            return log_f.detach(), torch.autograd.grad(log_f.sum(), z)[0]

    eps = torch.full((len(x), 1), step_size)
    log_w = torch.zeros(chains, len(x))
    for t in range(1, num_steps + 1):
        with torch.no_grad():
            log_q, log_p = parts(z)
        log_w += (betas[t] - betas[t - 1]) * (log_p - log_q)
        if t == num_steps:
            break
        beta = betas[t]
        p0 = torch.randn_like(z)
        log_f0, g = grad(z, beta)
        position, p = z, p0 + 0.5 * eps * g
        for i in range(leapfrog):
            position = position + eps * p
            log_f1, g = grad(position, beta)
            p = p + (eps if i < leapfrog - 1 else 0.5 * eps) * g
        h0 = -log_f0 + 0.5 * p0.square().sum(-1)
        h1 = -log_f1 + 0.5 * p.square().sum(-1)
        accept = torch.exp(torch.clamp(h0 - h1, max=0.0)).nan_to_num(0.0)
        z = torch.where((torch.rand_like(accept) < accept)[..., None], position, z)
        eps = (eps * torch.exp(gain * (accept[num_chains:].mean(0) - target))[:, None]
               ).clamp(1e-4, 1.0)
    return torch.logsumexp(log_w[:num_chains], 0) - math.log(num_chains)


def _gemm_seconds(model, x, steps, chains) -> float:
    """Decoder FLOPs of the leapfrog gradients (forward + input gradient), over SGEMM."""
    sizes = [layer.weight.shape for layer in model.decoder.layers if hasattr(layer, "weight")]
    per_row = sum(2 * out_f * in_f for out_f, in_f in sizes)
    evals = steps * (10 + 1)  # leapfrog gradients plus the start of each trajectory
    flops = 2 * per_row * chains * len(x) * evals
    a = torch.randn(2048, 2048)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    rate = 5 * 2 * 2048**3 / (time.perf_counter() - start)
    return flops / rate


def _print(results: dict, args) -> None:
    print(f"\nMNIST VAE, {args.points} test points, {args.chains} chains")
    print("| estimate | log p(x) | se | s/point |")
    print("| --- | ---: | ---: | ---: |")
    for key, r in results.items():
        if key.startswith(("ais/", "is/")):
            print(f"| {key} | {r['log_marginal']:.2f} | {r['log_marginal_se']:.2f} | "
                  f"{r['per_point_seconds']:.2f} |")
    _print_paired(results)
    print("\n| BDMC steps | lower | upper | sandwich | s/point |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for key, r in results.items():
        if key.startswith("bdmc/"):
            print(f"| {key[5:]} | {r['lower']:.2f} | {r['upper']:.2f} | {r['gap']:.3f} | "
                  f"{r['per_point_seconds']:.2f} |")
    if "speed" in results:
        s = results["speed"]
        print(f"\nais() / plain loop: {s['ratio']:.2f}x; over the GEMM bound: library "
              f"{s['library_over_gemm']:.1f}x, plain {s['plain_over_gemm']:.1f}x")


def _print_paired(results: dict) -> None:
    """Each AIS row against the fewest-steps row of the same step-size rule, point by
    point (the spread over points cancels): the change and its standard error."""
    rows = [(k, r) for k, r in results.items() if k.startswith("ais/") and "per_point" in r]
    if len(rows) < 2:
        return
    print("\n| AIS rule | steps | change from the fewest steps, paired (se) |")
    print("| --- | ---: | ---: |")
    for rule in ("adapt", "fixed"):
        same = sorted((r["num_steps"], torch.tensor(r["per_point"])) for k, r in rows
                      if k.endswith(rule))
        for steps, values in same[1:]:
            diff = values - same[0][1]
            se = float(diff.std() / math.sqrt(len(diff)))
            print(f"| {rule} | {steps} | {float(diff.mean()):+.3f} ({se:.3f}) vs "
                  f"{same[0][0]} |")


if __name__ == "__main__":
    main()
