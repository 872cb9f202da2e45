"""Burda, Grosse & Salakhutdinov (2016), Table 1: VAE and IWAE, one stochastic layer, MNIST.

Trains the paper's one-layer model with the library's public API (``ppl_vae.fit``):
784-200-200-50 with tanh, a Bernoulli likelihood and a diagonal Gaussian MLP encoder, on
Larochelle & Murray's statically binarized MNIST (Burda et al. used dynamic binarization;
see ``--binarize``). Rows:

- VAE, k = 1, 5, 50: the ordinary ELBO averaged over k samples per datapoint
  (``objective="elbo", num_particles=k``); IWAE k = 1 is the same model as VAE k = 1;
- IWAE, k = 5, 50 (``objective="iwae", num_particles=k``), with the reparameterized
  gradient and with doubly reparameterized gradients (``gradient="dreg"``).

Every row gets the same optimizer steps on the same training subset (not the same wall
time: an IWAE k = 50 step costs about 10x a k = 1 step here). Each trained model is then
measured on a fixed random subset of test points:

- test log p(x) by importance sampling from the encoder with K = 5000 (``diagnostics``),
  with its standard error, ESS and PSIS k-hat;
- log p(x) by AIS from the encoder (``ppl_vae.ais``) on a smaller subset, with the K = 5000
  estimate of the same points beside it;
- ELBO surgery (``ppl_vae.elbo_surgery``): active units by Burda's rule
  (Cov_x E_q[u | x] > 0.01), KL, mutual information and marginal KL.

    python -m benchmarks.iwae_table --data-root ../shared/data          # the README's run
    python -m benchmarks.iwae_table --quick                              # a smoke run
    python -m benchmarks.iwae_table --rows vae-k50 iwae-k50 ... &        # one process each

Resumable: training checkpoints with ``fit(checkpoint=..., resume=True)``, each trained
model's state_dict is saved, and every finished measurement is stored in
``<out>/iwae_table.json`` under a key naming its budget (``benchmarks.store.Store``, safe
for several processes at once); a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path

import torch

import ppl_vae
from benchmarks.store import Store, opened
from ppl_vae.guides import MLPEncoder
from ppl_vae.json_output import dumps
from ppl_vae.models import VAE

LATENT, HIDDEN, ACTIVATION = 50, (200, 200), "tanh"
RESULTS = Path(__file__).parent / "results" / "iwae_table.json"
# The options that name a budget: stored with the results, so that a reader (notebook 08)
# can rebuild the keys and the table's header.
BUDGET_OPTIONS = ("train_size", "steps", "batch_size", "lr", "lr_schedule", "binarize",
                  "test_points", "num_samples", "ais_points", "ais_steps", "ais_chains", "seed")

# name: (objective, k, gradient). IWAE k=1 is VAE k=1 and is not trained twice.
ROWS = {
    "vae-k1": ("elbo", 1, "reparam"),
    "vae-k5": ("elbo", 5, "reparam"),
    "vae-k50": ("elbo", 50, "reparam"),
    "iwae-k5": ("iwae", 5, "reparam"),
    "iwae-k50": ("iwae", 50, "reparam"),
    "iwae-k5-dreg": ("iwae", 5, "dreg"),
    "iwae-k50-dreg": ("iwae", 50, "dreg"),
}

# Table 1 of Burda et al. (2016), MNIST, one stochastic layer: test NLL (K = 5000) and
# active units, as commonly cited; the search corpus held the paper's abstract but not its
# table, so these were not checked against the paper's text here. The IWAE k=1 row is the
# VAE k=1 row (the two objectives coincide).
PAPER = {
    ("vae", 1): (86.76, 19), ("vae", 5): (86.47, 20), ("vae", 50): (86.35, 20),
    ("iwae", 1): (86.76, 19), ("iwae", 5): (85.54, 22), ("iwae", 50): (84.78, 25),
}

TABLE = (  # (label, row, paper key)
    ("VAE k=1", "vae-k1", ("vae", 1)),
    ("VAE k=5", "vae-k5", ("vae", 5)),
    ("VAE k=50", "vae-k50", ("vae", 50)),
    ("IWAE k=1 (= VAE k=1)", "vae-k1", ("iwae", 1)),
    ("IWAE k=5", "iwae-k5", ("iwae", 5)),
    ("IWAE k=5, DReG", "iwae-k5-dreg", ("iwae", 5)),
    ("IWAE k=50", "iwae-k50", ("iwae", 50)),
    ("IWAE k=50, DReG", "iwae-k50-dreg", ("iwae", 50)),
)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    out, store = opened(args, "iwae_table.json")
    if not args.print_only:
        for row in args.rows:
            measure_row(store, row, args, out)
    export(store.results, args, Path(args.results) if args.results else
           out / "iwae_table_export.json" if args.quick else RESULTS)
    print(markdown_table(store.results, args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--train-size", type=int, default=10_000,
                        help="training images (a fixed random subset of the 50,000)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps, every row")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-schedule", default="exponential",
                        choices=["constant", "cosine", "exponential"])
    parser.add_argument("--binarize", default="static", choices=["static", "dynamic"],
                        help="static: Larochelle & Murray's fixed binarization; dynamic: "
                             "MNIST intensities redrawn every minibatch, as Burda et al.")
    parser.add_argument("--test-points", type=int, default=500,
                        help="test points of the K=5000 estimate and the active units")
    parser.add_argument("--num-samples", type=int, default=5000, help="K of log p(x)")
    parser.add_argument("--ais-points", type=int, default=50)
    parser.add_argument("--ais-steps", type=int, default=100)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in about a minute (its own keys in the store)")
    parser.add_argument("--print-only", action="store_true",
                        help="print the table of what the store holds; measure nothing")
    parser.add_argument("--results", default=None,
                        help="the JSON of results to write (default "
                             "benchmarks/results/iwae_table.json; with --quick, in --out)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/iwae")
    return _Quick(parser)


class _Quick:
    """The parser, with --quick shrinking every count after parsing."""

    def __init__(self, parser):
        self.parser = parser

    def parse_args(self, argv=None):
        args = self.parser.parse_args(argv)
        if args.quick:
            args.train_size, args.steps, args.test_points = 500, 20, 50
            args.num_samples, args.ais_points, args.ais_steps = 200, 10, 10
        return args


def budget_tag(args) -> str:
    """The training budget in a key: rows trained under other budgets do not mix."""
    return (f"n{args.train_size}-s{args.steps}-b{args.batch_size}-lr{args.lr:g}"
            f"-{args.lr_schedule}-{args.binarize}-seed{args.seed}")


def eval_tag(args) -> str:
    return f"test{args.test_points}"


# ------------------------------------------------------------------ models and data


def build(seed: int):
    """The paper's one-layer VAE and encoder (784-200-200-50, tanh)."""
    torch.manual_seed(seed)  # the initial weights; fit(seed=...) seeds the training draws
    model = VAE(784, LATENT, hidden=HIDDEN, activation=ACTIVATION)
    encoder = MLPEncoder(784, LATENT, hidden=HIDDEN, activation=ACTIVATION)
    return model, encoder


def training_data(args):
    if args.binarize == "static":
        return ppl_vae.load_dataset("binarized_mnist", "train", root=args.data_root,
                                    limit=args.train_size, seed=args.seed)
    return ppl_vae.load_dataset("mnist", "train", root=args.data_root,
                                limit=args.train_size, seed=args.seed)


def test_data(args, limit: int):
    """A fixed random subset of the test split (it is sorted by class: never a prefix).
    Dynamic binarization is evaluated on one fixed draw of the test intensities."""
    if args.binarize == "static":
        return ppl_vae.load_dataset("binarized_mnist", "test", root=args.data_root,
                                    limit=limit, seed=args.seed)
    return ppl_vae.load_dataset("mnist", "test", root=args.data_root, limit=limit,
                                seed=args.seed, binarize="static")


# ------------------------------------------------------------------ the measurements


def measure_row(store: Store, row: str, args, out: Path) -> None:
    """Train one row (resumable) and store each measurement of it not yet stored."""
    tag = f"{budget_tag(args)}/{row}"
    model, encoder = build(args.seed)
    store.run(f"{tag}/train", partial(train, model, encoder, row, tag, args, out))
    state = torch.load(_weights_path(out, tag), weights_only=True)
    model.load_state_dict(state["model"])
    encoder.load_state_dict(state["encoder"])
    for p in (*model.parameters(), *encoder.parameters()):
        p.requires_grad_(False)
    etag = f"{tag}/{eval_tag(args)}"
    x = test_data(args, args.test_points)
    store.run(f"{etag}/is{args.num_samples}",
              partial(importance_sampled, model, encoder, x, args.num_samples, args.seed))
    store.run(f"{etag}/surgery", partial(surgery, model, encoder, x, args.seed))
    xa = test_data(args, args.ais_points)
    atag = f"{tag}/ais{args.ais_points}x{args.ais_steps}x{args.ais_chains}"
    store.run(atag, partial(ais_log_px, model, encoder, xa, args))


def train(model, encoder, row: str, tag: str, args, out: Path) -> dict:
    objective, k, gradient = ROWS[row]
    x = training_data(args)
    path = out / (tag.replace("/", "_") + ".ckpt")
    start = time.perf_counter()
    result = ppl_vae.fit(model, encoder, x, num_steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, lr_schedule=args.lr_schedule, objective=objective,
                         num_particles=k, gradient=gradient, seed=args.seed,
                         binarize="dynamic" if args.binarize == "dynamic" else None,
                         progress=False, checkpoint=path,
                         checkpoint_every=max(1, args.steps // 10), resume=path.exists())
    torch.save({"model": model.state_dict(), "encoder": encoder.state_dict()},
               _weights_path(out, tag))
    tail = result.history[-max(1, len(result.history) // 10):]
    return {"objective": objective, "num_particles": k, "gradient": gradient,
            "steps": result.num_steps, "train_objective_last10pct": float(tail.mean()),
            "seconds_this_call": time.perf_counter() - start,
            "step_seconds": float(result.step_seconds.sum())}


def _weights_path(out: Path, tag: str) -> Path:
    return out / (tag.replace("/", "_") + ".pt")


def importance_sampled(model, encoder, x, num_samples: int, seed: int) -> dict:
    """Test log p(x) by importance sampling from the encoder, with the ELBO beside it."""
    d = ppl_vae.diagnostics(model, encoder, x, num_samples=num_samples, seed=seed,
                            progress=False)
    return {**d.summary(), "log_px": d.log_marginal.tolist()}


def surgery(model, encoder, x, seed: int) -> dict:
    report = ppl_vae.elbo_surgery(model, encoder, x, num_samples=8, seed=seed)
    return {**report.summary(), "kl_per_dim": report.kl_per_dim.tolist(),
            "activity": report.activity.tolist()}


def ais_log_px(model, encoder, x, args) -> dict:
    """AIS from the encoder, and the K=5000 importance-sampled estimate of the same points."""
    result = ppl_vae.ais(model, x, proposal=encoder, num_steps=args.ais_steps,
                         num_chains=args.ais_chains, seed=args.seed, progress=False)
    d = ppl_vae.diagnostics(model, encoder, x, num_samples=args.num_samples, seed=args.seed,
                            progress=False)
    lp, se = result.log_marginal.double(), result.log_marginal_se.double().nan_to_num()
    return {"num_data": len(x), "num_steps": args.ais_steps, "num_chains": args.ais_chains,
            "log_px": float(lp.mean()),
            "log_px_se": math.sqrt(float(lp.var()) / len(lp) + float(se.square().sum())
                                   / len(lp) ** 2),
            "is_log_px": float(d.log_marginal.mean()),
            # Paired over the same points: the spread of the difference, not of either.
            "ais_minus_is": float((lp - d.log_marginal.double()).mean()),
            "ais_minus_is_se": float((lp - d.log_marginal.double()).std() / math.sqrt(len(lp))),
            "acceptance": float(result.acceptance.mean()), "ais_seconds": result.seconds}


# ------------------------------------------------------------------ printing


def budget_argv(args) -> list[str]:
    """The command-line options of this budget, as ``_parser().parse_args`` reads them."""
    return [item for name in BUDGET_OPTIONS
            for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def export(results: dict, args, path: Path) -> None:
    """The entries of this budget, with the options that name it under ``"_args"``."""
    prefix = budget_tag(args) + "/"
    kept = {k: v for k, v in results.items() if k.startswith(prefix)}
    if not kept:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps({"_args": budget_argv(args), **kept}, indent=1))


def _get(results: dict, key: str):
    return results.get(key)


def _paired(entry, base) -> str:
    """NLL minus VAE k=1's on the same test points, with the SE of the paired mean."""
    if entry is None or base is None:
        return "—"
    d = -(torch.tensor(entry["log_px"]) - torch.tensor(base["log_px"])).double()
    return f"{float(d.mean()):+.2f} ± {float(d.std()) / math.sqrt(len(d)):.2f}"


def markdown_table(results: dict, args) -> str:
    """The table: ours (test NLL = -log p(x), active units, AIS) beside the paper's."""
    head = (f"Budget: {args.train_size} training images "
            f"({args.binarize}ally binarized MNIST), {args.steps} Adam steps of "
            f"{args.batch_size} (lr {args.lr:g}, {args.lr_schedule}) for every row; test "
            f"NLL by IS with K={args.num_samples} and active units on {args.test_points} "
            f"random test points; AIS {args.ais_chains} chains x {args.ais_steps} steps on "
            f"{args.ais_points} of them. Paper: 3280 epochs on 60,000 images, 10,000 test "
            "points.")
    lines = [head, "",
             "| model | NLL (ours) | NLL (paper) | vs VAE k=1 (ours, paired) | (paper) "
             "| active units (KL > 0.1 nat) (ours) | (paper) "
             "| NLL by AIS / by IS, same points "
             "| train time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = _get(results, f"{budget_tag(args)}/vae-k1/{eval_tag(args)}/is{args.num_samples}")
    for label, row, paper_key in TABLE:
        tag = f"{budget_tag(args)}/{row}"
        tr = _get(results, f"{tag}/train")
        is_ = _get(results, f"{tag}/{eval_tag(args)}/is{args.num_samples}")
        sg = _get(results, f"{tag}/{eval_tag(args)}/surgery")
        ais = _get(results, f"{tag}/ais{args.ais_points}x{args.ais_steps}x{args.ais_chains}")
        nll = f"{-is_['log_marginal']:.2f} ± {is_['log_marginal_se']:.2f}" if is_ else "—"
        # Beside Burda's count, the units that carry more than 0.1 nats: short of
        # convergence, unused units have not yet collapsed onto the prior, and their small
        # leftover activity still passes the 0.01 rule.
        au = (f"{sg['active_units']} ({sum(v > 0.1 for v in sg['kl_per_dim'])})"
              if sg else "—")
        both = (f"{-ais['log_px']:.2f} / {-ais['is_log_px']:.2f}" if ais else "—")
        secs = f"{tr['step_seconds'] / 60:.1f} min" if tr else "—"
        paper_nll, paper_au = PAPER[paper_key]
        paper_delta = paper_nll - PAPER[("vae", 1)][0]
        lines.append(f"| {label} | {nll} | {paper_nll:.2f} | {_paired(is_, base)} "
                     f"| {paper_delta:+.2f} | {au} | {paper_au} | {both} | {secs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
