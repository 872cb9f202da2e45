"""Training recipes for the MNIST VAE: held-out log p(x) against wall-clock time.

The VAE of ``benchmarks/vae_mnist.py`` (784-200-200-50, tanh, Bernoulli) trained under
each recipe for the same wall-clock budget, with ``fit``'s documented options only
(``binarize``, ``objective``/``num_particles``, ``kl_warmup``, ``lr_schedule``, ``lr``,
``batch_size``). Every ``--eval-minutes`` of training the encoder's importance-sampled
log p(x) (K=``--eval-samples``) is measured on fixed statically binarized MNIST test
points (Larochelle & Murray's set); the clock counts training only. At the end, AIS from
the encoder on ``--ais-points`` of them. Writes ``--out``/train_recipe.json (resumable:
each recipe keeps a checkpoint and each measurement is stored) and train_recipe.png.

    python -m benchmarks.train_recipe --data-root ../shared/data [--minutes 7 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import ppl_vae
from benchmarks.store import opened
from ppl_vae.cli import load_checkpoint
from ppl_vae.data import load_dataset
from ppl_vae.guides import MLPEncoder
from ppl_vae.models import VAE

PUBLISHED = -88.71  # Burda et al., this VAE after 3280 epochs (static MNIST test)
# name -> (training data, fit options)
RECIPES = {
    "static, Adam 1e-3": ("binarized_mnist", {}),
    "dynamic, Adam 1e-3": ("mnist", {"binarize": "dynamic"}),
    "dynamic, Adam 3e-3 cosine": ("mnist", {"binarize": "dynamic", "lr": 3e-3,
                                            "lr_schedule": "cosine"}),
    "dynamic, 3e-3 cosine, KL warm-up": ("mnist", {"binarize": "dynamic", "lr": 3e-3,
                                                   "lr_schedule": "cosine",
                                                   "kl_warmup": 3000}),
    "dynamic, IWAE k=5, 3e-3 cosine": ("mnist", {"binarize": "dynamic", "lr": 3e-3,
                                                 "lr_schedule": "cosine",
                                                 "objective": "iwae", "num_particles": 5}),
}
BATCH = 100


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    out, store = opened(args, "train_recipe.json")
    x_test = load_dataset("binarized_mnist", "test", root=args.data_root,
                          limit=args.eval_points, seed=0)
    for name in args.recipes or RECIPES:
        _run_recipe(name, store, x_test, out, args)
    if args.reference:  # e.g. the 200-epoch model of benchmarks/vae_mnist.py
        model, guide, _ = load_checkpoint(args.reference)
        store.run("reference", lambda: {"checkpoint": args.reference,
                                        **_held_out(model, guide, x_test, args)})
    results = dict(store.results)
    for path, label in args.merge or []:  # another run's results, e.g. a longer budget
        other = json.loads(Path(path).read_text())
        results.update({k.replace("/", f", {label}/", 1): v for k, v in other.items()})
    _print(results, args)
    _plot(results, out / "train_recipe.png")


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--minutes", type=float, default=7.0, help="training time per recipe")
    parser.add_argument("--eval-minutes", type=float, default=1.5)
    parser.add_argument("--eval-points", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--ais-points", type=int, default=100)
    parser.add_argument("--ais-steps", type=int, default=100)
    parser.add_argument("--recipes", nargs="*", choices=list(RECIPES), default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--merge", nargs=2, action="append", metavar=("JSON", "LABEL"),
                        help="also show another run's results, its recipes named + LABEL")
    parser.add_argument("--reference", default=None,
                        help="a ppl-vae checkpoint to evaluate on the same points")
    parser.add_argument("--out", default="runs/train_recipe")
    return parser


def _build():
    torch.manual_seed(0)
    return VAE(784, 50, hidden=(200, 200)), MLPEncoder(784, 50, hidden=(200, 200))


def _run_recipe(name, store, x_test, out, args) -> None:
    dataset, options = RECIPES[name]
    x = load_dataset(dataset, "train", root=args.data_root)
    # The schedule needs the run's length up front: steps in the budget, from a probe.
    store.run(f"{name}/plan", lambda: {"num_steps": _steps_in_budget(x, options, args)})
    num_steps = store.results[f"{name}/plan"]["num_steps"]
    eval_every = max(1, round(num_steps * args.eval_minutes / args.minutes))
    key = f"{name}/final"
    if key not in store.results:
        model, guide = _build()
        clock = _Clock(store, name)
        path = out / f"{_slug(name)}.pt"

        def evaluate(step, elbo):
            if (step + 1) % eval_every == 0 or step + 1 == num_steps:
                clock.pause()
                store.run(f"{name}/step{step + 1}",
                          lambda: {"step": step + 1, "train_seconds": clock.seconds,
                                   "train_objective": elbo,
                                   **_held_out(model, guide, x_test, args)})
                clock.resume()

        ppl_vae.fit(model, guide, x, num_steps=num_steps, batch_size=BATCH, seed=0,
                    checkpoint=path, checkpoint_every=eval_every, resume=path.exists(),
                    callback=evaluate, progress=False, **options)
        # Every k-th point: the test split is sorted by class, so a prefix would be
        # mostly zeros and ones.
        every = max(1, len(x_test) // args.ais_points)
        store.run(key, lambda: _ais(model, guide, x_test[::every][: args.ais_points], args))


def _steps_in_budget(x, options, args) -> int:
    model, guide = _build()
    probe = 60
    result = ppl_vae.fit(model, guide, x, num_steps=probe, batch_size=BATCH, seed=0,
                         progress=False, **options)
    seconds = float(result.step_seconds[10:].mean())  # past the tracing of the first steps
    return max(1, math.floor(args.minutes * 60 / seconds))


class _Clock:
    """Training seconds: wall-clock between callbacks, without the evaluations. On a
    resumed run it starts from the last stored evaluation."""

    def __init__(self, store, name):
        done = [r["train_seconds"] for k, r in store.results.items()
                if k.startswith(f"{name}/step")]
        self.seconds = max(done, default=0.0)
        self._since = time.perf_counter()

    def pause(self):
        self.seconds += time.perf_counter() - self._since

    def resume(self):
        self._since = time.perf_counter()


def _held_out(model, guide, x_test, args) -> dict:
    summary = ppl_vae.diagnostics(model, guide, x_test, args.eval_samples, seed=0).summary()
    return {key: summary[key] for key in ("log_marginal", "log_marginal_se", "elbo")}


def _ais(model, guide, x, args) -> dict:
    result = ppl_vae.ais(model, x, proposal=guide, num_steps=args.ais_steps, num_chains=16,
                         seed=0, progress=False)
    is_estimate = ppl_vae.log_marginal(model, guide, x, args.eval_samples, seed=0)
    return {"ais_points": len(x), "ais_steps": args.ais_steps, **result.summary(),
            "is_same_points": float(is_estimate.mean())}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _print(results: dict, args) -> None:
    print(f"\nMNIST VAE, {args.minutes:g} min of training per recipe ({args.threads} "
          f"thread); held-out log p(x), published {PUBLISHED}")
    print("| recipe | steps | train s | IS log p(x) | AIS log p(x) (IS, same points) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in _names(results):
        curve = _curve(results, name)
        final = results.get(f"{name}/final")
        if not curve:
            continue
        last = curve[-1]
        ais = (f"{final['log_marginal']:.2f} ({final['is_same_points']:.2f})"
               if final else "-")
        print(f"| {name} | {last['step']} | {last['train_seconds']:.0f} | "
              f"{last['log_marginal']:.2f} +- {last['log_marginal_se']:.2f} | {ais} |")
    if "reference" in results:
        r = results["reference"]
        print(f"| {r['checkpoint']} | | | {r['log_marginal']:.2f} +- "
              f"{r['log_marginal_se']:.2f} | |")


def _names(results: dict) -> list[str]:
    """Recipes with measurements, in the order they were run (a merged longer run of a
    recipe under another name included)."""
    return list(dict.fromkeys(k.split("/step")[0] for k in results if "/step" in k))


def _curve(results: dict, name: str) -> list[dict]:
    rows = [r for k, r in results.items() if k.startswith(f"{name}/step")]
    return sorted(rows, key=lambda r: r["step"])


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in _names(results):
        curve = _curve(results, name)
        if curve:
            ax.plot([r["train_seconds"] / 60 for r in curve],
                    [r["log_marginal"] for r in curve], marker="o", label=name)
    ax.axhline(PUBLISHED, color="k", ls="--", lw=1, label=f"published ({PUBLISHED})")
    # A recipe that failed (far below) would squash the others: it is cut off.
    ax.set_ylim(max(ax.get_ylim()[0], PUBLISHED - 20), PUBLISHED + 3)
    ax.set_xlabel("training time (minutes, evaluation excluded)")
    ax.set_ylabel("held-out log p(x), IS from the encoder (nats)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
