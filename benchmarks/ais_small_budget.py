"""AIS from the prior at small budgets: ``ppl_vae.ais`` against a plain Cremer-style loop.

The reference is the AIS of Cremer, Li & Duvenaud's evaluation code (2018), written
here in plain PyTorch: from the prior, a linear schedule, HMC with 10 leapfrog steps and
ONE step size for the whole batch, started at 0.1 and multiplied by 1.02 when the
batch's mean acceptance probability is above 0.65, by 0.98 otherwise (kept in [1e-4,
0.5]). Its step size is steered by the very chains it weighs, so its weights are not
exactly unbiased; ``ppl_vae.ais`` steers from separate pilot chains instead.

Two models, each trained here with ``ppl_vae.fit`` and cached under ``--out``:

- ``--model digits``: the digits VAE of ``ppl-vae gaps``, VAE(64, 8, (200, 200)),
  ``--epochs`` (200) epochs on the embedded digits; the first ``--points`` test digits.
- ``--model mnist``: the MNIST VAE, VAE(784, 50, (200, 200)), 60 epochs on a
  seeded random subset of 50000 rows of statically binarized MNIST (``--data-root`` or
  ``PPL_VAE_DATA``); ``--points`` seeded test points.

Both AIS run with the same number of steps and chains; the table gives ours - theirs
per datapoint (paired), its mean and standard error, at each step count.

    python -m benchmarks.ais_small_budget [--model mnist] [--steps 30 100 1000] \
        [--chains 16] [--label after]

Each measurement is written to ``benchmarks/results/ais_small_budget.json`` as soon as
it is done (keys ``ours/<label>/<steps>`` and ``cremer/<steps>``, prefixed ``mnist/``
for the MNIST VAE); a rerun skips it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import ppl_vae
from benchmarks import plain_loops as plain
from benchmarks.store import Store
from benchmarks.timing import row
from ppl_vae.guides import MLPEncoder
from ppl_vae.models import VAE

RESULTS = Path(__file__).parent / "results" / "ais_small_budget.json"


def cremer_ais(decoder, x: torch.Tensor, num_steps: int, num_chains: int, *,
               step_size: float = 0.1, target: float = 0.65, leapfrog: int = 10,
               seed: int = 0) -> torch.Tensor:
    """log p(x) per datapoint (N,) by Cremer-style AIS from the N(0, I) prior.

    ``decoder`` maps z (..., k) to Bernoulli logits (..., D); x is (N, D) binary.
    """
    torch.manual_seed(seed)
    k = decoder.layers[0].in_features
    z = torch.randn(num_chains, len(x), k)
    betas = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64).tolist()

    def parts(z):
        log_prior = plain.log_normal(z)
        return log_prior, log_prior + plain.bernoulli_log_lik(decoder(z), x)

    eps = torch.tensor(step_size)
    log_w = torch.zeros(num_chains, len(x))
    for t in range(1, num_steps + 1):
        with torch.no_grad():
            log_q, log_p = parts(z)
        log_w += (betas[t] - betas[t - 1]) * (log_p - log_q)
        if t == num_steps:  # a last transition would not change the weights
            break
        z, accept = plain.hmc(parts, z, betas[t], eps, leapfrog)
        eps = (eps * (1.02 if float(accept.mean()) > target else 0.98)).clamp(1e-4, 0.5)
    return torch.logsumexp(log_w, 0) - math.log(num_chains)


# name: (data dim, latent dim, epochs of training or None for --epochs, training rows)
MODELS = {"digits": (64, 8, None, None), "mnist": (784, 50, 60, 50000)}


def trained_vae(name: str, out: Path, epochs: int, data_root) -> VAE:
    """The ``name`` VAE of MODELS, trained once (seed 0) and cached in ``out``."""
    data_dim, latent, fixed_epochs, rows = MODELS[name]
    epochs = fixed_epochs or epochs
    path = out / f"{name}_vae_{epochs}.pt"
    torch.manual_seed(0)
    model = VAE(data_dim, latent, hidden=(200, 200))
    encoder = MLPEncoder(data_dim, latent, hidden=(200, 200))
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        x = _data(name, "train", data_root, rows)
        ppl_vae.fit(model, encoder, x, epochs=epochs, batch_size=100, lr=1e-3, seed=0,
                    progress=False)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _data(name: str, split: str, data_root, rows: int | None) -> torch.Tensor:
    if name == "digits":
        x = ppl_vae.load_dataset("digits", split, binarize="static")
        return x if rows is None else x[:rows]
    return ppl_vae.load_dataset("binarized_mnist", split, root=data_root, limit=rows, seed=0)


def ours(model, x, steps: int, chains: int, seed: int) -> dict:
    result = ppl_vae.ais(model, x, num_steps=steps, num_chains=chains, seed=seed,
                         progress=False)
    return {"per_point": result.log_marginal.tolist(), "mean": float(result.log_marginal.mean()),
            "step_size": float(result.step_size.mean()),
            "acceptance": float(result.acceptance.mean())}


def theirs(model, x, steps: int, chains: int, seed: int) -> dict:
    values = cremer_ais(model.decoder, x, steps, chains, seed=seed)
    return {"per_point": values.tolist(), "mean": float(values.mean())}


def paired(a: list, b: list) -> tuple[float, float]:
    """Mean and standard error of a - b over datapoints."""
    diff = torch.tensor(a) - torch.tensor(b)
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))


def print_table(results: dict, labels: list[str], steps: list[int], prefix: str = "") -> None:
    print(row("steps", "Cremer-style", *(f"ours ({label}) - theirs (se)" for label in labels)))
    print(row("---:", "---:", *("---:" for _ in labels)))
    for s in steps:
        ref = results.get(f"{prefix}cremer/{s}")
        if ref is None:
            continue
        cells = []
        for label in labels:
            got = results.get(f"{prefix}ours/{label}/{s}")
            if got is None:
                cells.append("")
                continue
            mean, se = paired(got["per_point"], ref["per_point"])
            cells.append(f"{mean:+.3f} ({se:.3f})")
        print(row(s, f"{ref['mean']:.3f}", *cells))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--data-root", default=None, help="MNIST's folder (or PPL_VAE_DATA)")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 100, 1000])
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--label", default="before", help="names this version of ais()")
    parser.add_argument("--compare", nargs="*", default=[], help="other labels to show")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/ais_small_budget"))
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = trained_vae(args.model, args.out, args.epochs, args.data_root)
    x = _data(args.model, "test", args.data_root, args.points)
    prefix = "" if args.model == "digits" else f"{args.model}/"
    store = Store(args.json)
    for s in args.steps:
        store.run(f"{prefix}cremer/{s}", lambda s=s: theirs(model, x, s, args.chains, args.seed))
        store.run(f"{prefix}ours/{args.label}/{s}",
                  lambda s=s: ours(model, x, s, args.chains, args.seed))
    print(f"\n{args.model} VAE, {len(x)} test points, {args.chains} chains, from the prior")
    print_table(store.results, [*args.compare, args.label], args.steps, prefix)


if __name__ == "__main__":
    main()
