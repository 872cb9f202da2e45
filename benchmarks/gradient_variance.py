"""How much do STL and DReG lower the variance of the encoder's gradient?

For a trained PPCA (d=20, k=4, full-covariance linear encoder, on data drawn from a
PPCA) and a small VAE on the digits (statically binarized, k=8, one hidden layer of
200), on a fixed minibatch of 100 rows, it draws the encoder's gradient ``--draws``
times (seeded) with each estimator at K = 5 and 50 samples per datapoint, and prints
the ratio of the traces of their covariances:

    ELBO:  standard reparameterized / sticking the landing (Roeder et al. 2017)
    IWAE:  standard reparameterized / DReG (Tucker et al. 2018)

with a bootstrap standard error over the draws, and the mean-gradient agreement: the
z-scores of the paired difference per coordinate, whose mean square is about
(n - 1) / (n - 3) for n unbiased draws (t-distributed), and their largest |z|.
Results go to ``<out>/gradient_variance.json``.

    python -m benchmarks.gradient_variance [--draws 200] [--vae-epochs 100]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae.gradients import DReG, StickingTheLanding
from ppl_vae.guides import LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE
from ppl_vae.objectives import IWAE
from ppl_vae.settings import module_local

BATCH, BOOTSTRAP = 100, 500


@module_local
def encoder_gradients(loss, model, guide, x, draws: int, num_data: int) -> torch.Tensor:
    """The guide's gradient of ``draws`` seeded calls on ``x``: shape (draws, P)."""
    loss_fn = loss(model, guide)
    idx = torch.arange(len(x))
    rows = []
    for draw in range(draws):
        torch.manual_seed(draw)
        loss_fn.zero_grad(set_to_none=True)
        loss_fn(x, idx=idx, num_data=num_data).backward()
        rows.append(torch.cat([p.grad.flatten() for p in guide.parameters()]))
    return torch.stack(rows).double()


def compare(standard: torch.Tensor, new: torch.Tensor) -> dict:
    """Ratio of covariance traces (standard / new), its bootstrap SE, the max |z|."""
    ratio = float(standard.var(0).sum() / new.var(0).sum())
    generator = torch.Generator().manual_seed(0)
    resampled = []
    for _ in range(BOOTSTRAP):
        pick = torch.randint(len(new), (len(new),), generator=generator)
        resampled.append(float(standard[pick].var(0).sum() / new[pick].var(0).sum()))
    diff = new - standard
    se = diff.std(0) / math.sqrt(len(diff))
    live = se > 0
    z = diff.mean(0)[live] / se[live]
    return {"ratio": ratio, "ratio_se": float(torch.tensor(resampled).std()),
            "trace_standard": float(standard.var(0).sum()),
            "trace_new": float(new.var(0).sum()), "max_abs_z": float(z.abs().max()),
            "mean_z2": float(z.square().mean()), "coordinates": int(live.sum())}


def measure(model, guide, x, num_data: int, draws: int) -> dict:
    results = {}
    for k in (5, 50):
        elbo = Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        pairs = {"elbo_over_stl": (elbo, StickingTheLanding(k)),
                 "iwae_over_dreg": (IWAE(k), DReG(k))}
        for name, (standard, new) in pairs.items():
            start = time.perf_counter()
            g_standard = encoder_gradients(standard, model, guide, x, draws, num_data)
            g_new = encoder_gradients(new, model, guide, x, draws, num_data)
            entry = {**compare(g_standard, g_new), "k": k,
                     "seconds": time.perf_counter() - start}
            results[f"{name}_k{k}"] = entry
            print(f"  {name:15s} k={k:3d}  ratio {entry['ratio']:9.2f} +- "
                  f"{entry['ratio_se']:.2f}   mean z^2 {entry['mean_z2']:.2f}  max|z| "
                  f"{entry['max_abs_z']:.2f} of {entry['coordinates']}", flush=True)
    return results


def ppca_setup(seed: int = 0):
    """A PPCA and encoder fitted by SVI to 1000 points drawn from a PPCA."""
    torch.manual_seed(seed)
    truth = PPCA(20, 4, sigma=0.5)
    with torch.no_grad():
        truth.W.normal_()
        x = truth.marginal().sample((1000,))
    model, guide = PPCA(20, 4), LinearEncoder(20, 4, covariance="full")
    ppl_vae.fit(model, guide, x, epochs=100, batch_size=100, lr=1e-2, seed=seed,
                lr_schedule="cosine", progress=False)
    return model, guide, x[:BATCH], len(x)


def vae_setup(epochs: int, seed: int = 0):
    """A VAE and MLP encoder fitted by the ELBO to the binarized digits."""
    x = ppl_vae.load_dataset("digits", binarize="static")
    test = ppl_vae.load_dataset("digits", split="test", binarize="static")
    torch.manual_seed(seed)
    model = VAE(x.shape[1], 8, hidden=(200,))
    guide = MLPEncoder(x.shape[1], 8, hidden=(200,))
    ppl_vae.fit(model, guide, x, epochs=epochs, batch_size=100, lr=1e-3, seed=seed,
                progress=False)
    return model, guide, test[:BATCH], len(x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--vae-epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"draws": args.draws, "batch": BATCH, "vae_epochs": args.vae_epochs}
    for name, setup in [("ppca", ppca_setup), ("vae_digits", lambda: vae_setup(args.vae_epochs))]:
        start = time.perf_counter()
        model, guide, x, num_data = setup()
        print(f"{name} (trained in {time.perf_counter() - start:.0f} s):", flush=True)
        results[name] = measure(model, guide, x, num_data, args.draws)
        (out / "gradient_variance.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'gradient_variance.json'}")


if __name__ == "__main__":
    main()
