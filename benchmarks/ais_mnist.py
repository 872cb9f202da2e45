"""AIS against importance sampling on the MNIST VAE, BDMC sandwiches, and AIS speed.

Uses the 200-epoch model of ``benchmarks/vae_mnist.py`` (``--checkpoint``) and a fixed
random subset of test points. Prints and writes (``--out``/ais_mnist.json):

1. log p(x) by AIS from the encoder at each ``--steps`` x ``--chains``, with adapted
   and with fixed step sizes side by side (a valid AIS estimate should not fall as the
   number of steps grows), and by importance sampling with K samples from the encoder
   and from fitted local (diagonal) guides;
2. BDMC on points simulated from the model: the sandwich upper - lower per step count;
3. seconds per datapoint of each;
4. ``ais()`` against the same AIS written as a plain PyTorch loop
   (``benchmarks.plain_loops.vae_ais``: same schedule, chains, leapfrog steps and
   pilot-chain adaptation), and the ratio of both to the
   GEMM bound (the leapfrog gradients' decoder FLOPs over the measured SGEMM rate).

    python -m benchmarks.ais_mnist --checkpoint runs/vae_mnist/epochs200.pt \\
        --data-root ../shared/data [--points 100 --steps 1000 5000 10000 --chains 16]

Each finished measurement is appended to the JSON, and a rerun skips it (resumable).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import ppl_vae
from benchmarks import plain_loops
from benchmarks.store import opened
from ppl_vae.cli import load_checkpoint
from ppl_vae.data import load_dataset

PILOT_CHAINS = plain_loops.PILOT_CHAINS


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
        torch.manual_seed(repeat)
        loc, scale = plain_loops.gaussian_encoder(encoder.net, x)
        reference = plain_loops.vae_ais(model.decoder, loc, scale, x, steps, chains)
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
