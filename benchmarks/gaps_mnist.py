"""Gaps of the MNIST VAE (benchmarks/vae_mnist.py's checkpoint) on 1000 test points.

    python -m benchmarks.gaps_mnist --data-root ../shared/data \
        [--checkpoint runs/vae_mnist/epochs200.pt] [--local diag] [--num-samples 5000]

Prints the GapReport and the time of the local fit and of the whole decomposition, in
all and per datapoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ppl_vae
from ppl_vae.cli import load_checkpoint, load_split
from ppl_vae.json_output import dumps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--checkpoint", default="runs/vae_mnist/epochs200.pt")
    parser.add_argument("--local", default="diag", choices=("diag", "full"))
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--test-points", type=int, default=1000)
    parser.add_argument("--out", default="runs/gaps_mnist")
    args = parser.parse_args(argv)
    model, guide, cfg = load_checkpoint(args.checkpoint)
    x = load_split(cfg, "test", args.data_root, limit=args.test_points)
    start = time.perf_counter()
    report = ppl_vae.gaps(model, guide, x, local=args.local, num_samples=args.num_samples,
                          seed=cfg.seed)
    seconds = time.perf_counter() - start
    print(report)
    print(f"{len(x)} test points, {torch.get_num_threads()} threads: {seconds:.1f} s in all, "
          f"{1e3 * seconds / len(x):.1f} ms per datapoint ({report.local_steps} local steps)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = report.to_dict(per_datapoint=False)
    summary.update(seconds=seconds, checkpoint=args.checkpoint)
    (out / "gaps.json").write_text(dumps(summary, indent=2))


if __name__ == "__main__":
    main()
