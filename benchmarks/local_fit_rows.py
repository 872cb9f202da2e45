"""fit_local's rows against a plain per-datapoint Adam loop run to convergence, on MNIST.

    python -m benchmarks.local_fit_rows --data-root ../shared/data \
        [--points 20] [--family diag] [--reference-steps 12000] [--threads 1]

Trains (or loads, from ``--checkpoint``) a VAE on binarized MNIST briefly, then for
``--points`` test points:

- the reference: every point's local guide, started where fit_local starts it, fitted by
  plain Pyro ``Trace_ELBO`` and ``torch.optim.Adam`` with a fixed staircase of learning
  rates (``REFERENCE_SCHEDULE``, ending at 1e-4) for ``--reference-steps`` steps, with no
  plateau rule at all. All points share one Adam over (N, ...) tensors: Adam is
  elementwise and the loss is a sum of per-point terms sharing no parameter, so that is
  N independent per-datapoint loops, run at once;
- ``fit_local`` on the same points alone (``--points``) and among ``--among`` points
  (the first ``--points`` of them the same): its ELBO per point minus the reference's,
  and the largest change of a row between the two fits;
- the time of fit_local on ``--among`` points, now and with the rule of today's main
  (``--baseline``: a module path of the previous ``fit_local_trusted``, skipped when absent).

Every ELBO is estimated with ``--num-samples`` draws per point, the same draws for every
guide (one seed), so the differences are measured far more precisely than the levels.
Prints a table and writes it as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae.guides import MLPEncoder
from ppl_vae.json_output import dumps
from ppl_vae.models import VAE
from ppl_vae.settings import module_local
from ppl_vae.train import frozen

_gaps = importlib.import_module("ppl_vae.local_fit")

# (fraction of the reference's steps, learning rate): the plain loop's schedule.
REFERENCE_SCHEDULE = ((0.25, 1e-2), (0.25, 3e-3), (0.2, 1e-3), (0.15, 3e-4), (0.15, 1e-4))


def trained_vae(args):
    """The benchmark's VAE: loaded from ``args.checkpoint`` or trained there first."""
    model = VAE(784, args.latent_dim, hidden=(200, 200))
    path = Path(args.checkpoint)
    if path.exists():
        model.load_state_dict(torch.load(path)["model"])
        return model, f"{path}"
    guide = MLPEncoder(784, args.latent_dim, hidden=(200, 200))
    x = ppl_vae.load_dataset("binarized_mnist", "train", root=args.data_root,
                             limit=args.train_points, seed=0)
    torch.manual_seed(0)
    ppl_vae.fit(model, guide, x, epochs=args.epochs, batch_size=100, lr=1e-3, seed=0,
                progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return model, f"trained here ({args.epochs} epochs on {args.train_points} points)"


@module_local
def reference(model, x, family: str, steps: int, num_particles: int, seed: int):
    """The plain loop: the starting guide of fit_local, Pyro's Trace_ELBO, torch's Adam,
    REFERENCE_SCHEDULE; no plateau rule, every step runs."""
    guide = _gaps.initial_local(model, x, family, None, seed=seed)
    loss_fn = Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=1)(model, guide)
    optimizer = torch.optim.Adam(guide.parameters(), lr=REFERENCE_SCHEDULE[0][1])
    pyro.set_rng_seed(seed)
    idx = torch.arange(len(x))
    done = 0
    with frozen(model), pyro.validation_enabled(False):
        for fraction, lr in REFERENCE_SCHEDULE:
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(round(fraction * steps)):
                optimizer.zero_grad()
                loss_fn(x, idx=idx, num_data=len(x)).backward()
                optimizer.step()
                done += 1
    return guide, done


def cached_reference(model, x, args, seed):
    """The reference fit, kept in ``--out`` so that a rerun with the same settings
    reuses it."""
    key = (f"reference_{args.family}_{len(x)}_{args.reference_steps}_"
           f"{args.reference_particles}_{seed}.pt")
    path = Path(args.out) / key
    if path.exists():
        saved = torch.load(path)
        guide = _gaps.initial_local(model, x, args.family, None, seed=seed)
        guide.load_state_dict(saved["guide"])
        return (guide, saved["steps"]), saved["seconds"]
    (guide, steps), seconds = timed(lambda: reference(
        model, x, args.family, args.reference_steps, args.reference_particles, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"guide": guide.state_dict(), "steps": steps, "seconds": seconds}, path)
    return (guide, steps), seconds


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def per_point(model, guide, x, rows, num_samples: int, seed: int) -> torch.Tensor:
    return ppl_vae.elbo(model, guide, x, num_samples, seed=seed)[:rows].double()


def mean_se(d: torch.Tensor) -> tuple[float, float]:
    return float(d.mean()), float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.nan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--checkpoint", default="runs/local_fit_rows/vae.pt")
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--train-points", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--among", type=int, default=100)
    parser.add_argument("--family", default="diag")
    parser.add_argument("--reference-steps", type=int, default=12000)
    parser.add_argument("--reference-particles", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/local_fit_rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = trained_vae(args)
    x = ppl_vae.load_dataset("binarized_mnist", "test", root=args.data_root,
                             limit=args.among, seed=args.seed)
    rows, seed, k = args.points, args.seed, args.num_samples

    def fitted(n, fit=_gaps.fit_local_trusted):
        (guide, result), seconds = timed(lambda: fit(
            model, x[:n], args.family, init_from=None, steps=3000, lr=3e-2,
            num_particles=8, progress=False, seed=seed))
        return guide, result.num_steps, seconds

    (ref, ref_steps), ref_seconds = cached_reference(model, x[:rows], args, seed)
    ref_elbo = per_point(model, ref, x[:rows], rows, k, seed + 1)
    alone, alone_steps, alone_seconds = fitted(rows)
    among, among_steps, among_seconds = fitted(args.among)
    result = {"model": source, "family": args.family, "points": rows, "among": args.among,
              "reference_steps": ref_steps, "reference_seconds": ref_seconds,
              "num_samples": k}
    table = {"alone": (alone, alone_steps, alone_seconds),
             "among": (among, among_steps, among_seconds)}
    if args.baseline:
        old = importlib.import_module(args.baseline).fit_local_trusted
        table["baseline alone"] = fitted(rows, old)
        table["baseline among"] = fitted(args.among, old)
    print(f"fit_local({args.family!r}) on {rows} binarized MNIST test points, VAE "
          f"{source}; reference: {ref_steps} plain Adam steps ({ref_seconds:.0f} s)")
    print(f"  {'fit':16} {'steps':>6} {'seconds':>8} {'L[q*] - ref mean':>17} {'se':>7}")
    for name, (guide, steps, seconds) in table.items():
        n = rows if "alone" in name else args.among
        diff = per_point(model, guide, x[:n], rows, k, seed + 1) - ref_elbo
        mean, se = mean_se(diff)
        result[name] = {"steps": steps, "seconds": seconds, "elbo_minus_reference": mean,
                        "se": se, "per_point": diff.tolist()}
        print(f"  {name:16} {steps:6d} {seconds:8.1f} {mean:17.4f} {se:7.4f}")
    change = max(float((a - b[:rows]).detach().abs().max())
                 for a, b in zip(alone.parameters(), among.parameters(), strict=True))
    result["largest_row_change_alone_vs_among"] = change
    print(f"  largest parameter change of a row, alone vs among {args.among}: {change:.2e}")
    print("  per point (alone - reference):",
          " ".join(f"{v:+.3f}" for v in result["alone"]["per_point"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"local_fit_rows_{args.family}.json").write_text(dumps(result, indent=2))


if __name__ == "__main__":
    main()
