"""Seconds for fit_local(..., "full") and fit_local(..., "flow") on 1000 MNIST test points.

    python -m benchmarks.fit_local_mnist --data-root ../shared/data \
        [--checkpoint runs/vae_mnist/epochs200.pt] [--test-points 1000] [--threads 1]

Uses the VAE of the checkpoint when the file exists, else a freshly initialised
VAE(784, 50) (a fit's time depends on the decoder's weights mostly through how many
steps the plateau rule lets it run). Every local fit starts at
the prior's moments and runs the same plateau schedule as ``gaps``. Prints a table and
writes it as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ppl_vae
from ppl_vae.json_output import dumps
from ppl_vae.models import VAE

FAMILIES = ("full", "flow")


def load_model(checkpoint: str):
    """(model, description): the checkpoint's VAE, or a fresh VAE(784, 50)."""
    if Path(checkpoint).exists():
        from ppl_vae.cli import load_checkpoint

        model, _, _ = load_checkpoint(checkpoint)
        return model, f"checkpoint {checkpoint}"
    torch.manual_seed(0)
    return VAE(784, 50), "fresh VAE(784, 50) (no checkpoint found)"


def time_family(model, x, family: str, seed: int) -> dict:
    """One local fit: seconds in all and per datapoint, steps, and the ELBO reached."""
    start = time.perf_counter()
    guide = ppl_vae.fit_local(model, x, family, seed=seed, progress=False)
    seconds = time.perf_counter() - start
    elbo = ppl_vae.elbo(model, guide, x, 100, seed=seed + 1)
    return {
        "family": family,
        "seconds": seconds,
        "ms_per_datapoint": 1e3 * seconds / len(x),
        "parameters": sum(p.numel() for p in guide.parameters()),
        "elbo": float(elbo.mean()),
        "elbo_se": float(elbo.std() / len(elbo) ** 0.5),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--checkpoint", default="runs/vae_mnist/epochs200.pt")
    parser.add_argument("--test-points", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/fit_local_mnist")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = load_model(args.checkpoint)
    x = ppl_vae.load_dataset("binarized_mnist", "test", root=args.data_root,
                             limit=args.test_points)
    rows = [time_family(model, x, family, args.seed) for family in FAMILIES]
    print(f"fit_local on {len(x)} binarized MNIST test points, {source}, "
          f"{args.threads} thread(s)")
    print(f"  {'family':6}  {'seconds':>8}  {'ms/point':>8}  {'params':>9}  {'ELBO':>9}")
    for row in rows:
        print(f"  {row['family']:6}  {row['seconds']:8.1f}  {row['ms_per_datapoint']:8.1f}  "
              f"{row['parameters']:9d}  {row['elbo']:9.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": source, "num_data": len(x), "threads": args.threads, "rows": rows}
    (out / "fit_local_mnist.json").write_text(dumps(result, indent=2))


if __name__ == "__main__":
    main()
