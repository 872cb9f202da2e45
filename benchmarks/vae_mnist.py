"""The standard experiment: the VAE of the literature on statically binarized MNIST.

Encoder 784-200-200-(2x50), decoder 50-200-200-784, tanh, Bernoulli, Adam lr 1e-3,
batch 100. Trains once, evaluating after each budget of epochs: test log p(x) with
K=5000 importance samples on a fixed random subset of 1000 test points (the test split is
sorted by class, so never a prefix), the test ELBO, and seconds per epoch. Burda, Grosse
& Salakhutdinov (IWAE paper) report -88.71 nats for this VAE after 3280 epochs.

    python -m benchmarks.vae_mnist --data-root ../shared/data [--budgets 10 50 200]

A checkpoint per budget goes to --out, for benchmarks/gaps_mnist.py.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

import ppl_vae
from benchmarks.timing import row
from ppl_vae.cli import RunConfig, build_guide, build_model, save_checkpoint
from ppl_vae.data import load_dataset
from ppl_vae.json_output import dumps

PUBLISHED = -88.71


def evaluate(model, guide, x_test, num_samples: int, seed: int) -> dict:
    d = ppl_vae.diagnostics(model, guide, x_test, num_samples, seed=seed)
    return d.summary()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--test-points", type=int, default=1000)
    parser.add_argument("--out", default="runs/vae_mnist")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x_train = load_dataset("binarized_mnist", "train", root=args.data_root)
    x_test = load_dataset("binarized_mnist", "test", root=args.data_root,
                          limit=args.test_points, seed=args.seed)
    cfg = RunConfig(model="vae", guide="mlp", dataset="binarized_mnist", latent_dim=50,
                    hidden=(200, 200), batch_size=100, lr=1e-3, seed=args.seed,
                    data_dim=x_train.shape[1])
    torch.manual_seed(args.seed)
    model, guide = build_model(cfg), build_guide(cfg)
    out = Path(args.out)
    results, done, train_seconds = [], 0, 0.0
    for budget in sorted(args.budgets):
        start = time.perf_counter()
        ppl_vae.fit(model, guide, x_train, epochs=budget - done, batch_size=cfg.batch_size,
                    lr=cfg.lr, seed=args.seed + done)
        train_seconds += time.perf_counter() - start
        done = budget
        start = time.perf_counter()
        summary = evaluate(model, guide, x_test, args.num_samples, args.seed)
        summary.update(epochs=budget, seconds_per_epoch=train_seconds / budget,
                       eval_seconds=time.perf_counter() - start)
        results.append(summary)
        save_checkpoint(out / f"epochs{budget}.pt", model, guide, replace(cfg, epochs=budget))
        print(dumps(summary))
    (out / "results.json").write_text(dumps(results, indent=2))
    print_table(results, args)


def print_table(results: list[dict], args) -> None:
    print(f"\nVAE 784-200-200-50 on binarized MNIST; {args.test_points} test points, "
          f"K={args.num_samples}; {torch.get_num_threads()} threads")
    print(row("epochs", "s/epoch", "test ELBO", "test log p(x) +- se", "to -88.71", "khat>0.7"))
    print(row(*["---"] * 6))
    for r in results:
        print(row(r["epochs"], f"{r['seconds_per_epoch']:.1f}",
                  f"{r['elbo']:.2f} +- {r['elbo_se']:.2f}",
                  f"{r['log_marginal']:.2f} +- {r['log_marginal_se']:.2f}",
                  f"{r['log_marginal'] - PUBLISHED:+.2f}", f"{r['khat_above_0.7']:.1%}"))


if __name__ == "__main__":
    main()
