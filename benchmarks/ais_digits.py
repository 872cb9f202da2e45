"""gaps(log_px="ais")'s defaults on the digits VAE of ``ppl-vae gaps``: fast enough, and
at least as high as importance sampling with K=1000 from the encoder.

Trains VAE(64, 8, hidden=(200, 200)) + MLPEncoder for 200 epochs on the digits, fits
diagonal local guides on 100 test digits, and runs AIS from them at several step counts
(16 chains). Prints seconds and the paired difference to IS (K=1000, encoder) and writes
``--out``/ais_digits.json.

    python -m benchmarks.ais_digits [--steps 100 200 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import ppl_vae
from ppl_vae.guides import MLPEncoder
from ppl_vae.json_output import dumps
from ppl_vae.models import VAE


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 1000])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/ais_digits")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = ppl_vae.load_dataset("digits", "train", binarize="static")
    x_test = ppl_vae.load_dataset("digits", "test", binarize="static")[: args.points]
    torch.manual_seed(0)
    model, encoder = VAE(64, 8, hidden=(200, 200)), MLPEncoder(64, 8, hidden=(200, 200))
    ppl_vae.fit(model, encoder, x, epochs=200, batch_size=100, lr=1e-3, seed=0, progress=False)
    importance = ppl_vae.log_marginal(model, encoder, x_test, 1000, seed=0)
    local = ppl_vae.fit_local(model, x_test, "diag", init_from=encoder, progress=False, seed=0)
    rows = []
    for steps in args.steps:
        start = time.perf_counter()
        result = ppl_vae.ais(model, x_test, proposal=local, num_steps=steps, num_chains=16,
                             seed=0, progress=False)
        difference = result.log_marginal - importance
        rows.append({"steps": steps, "seconds": time.perf_counter() - start,
                     "log_px": float(result.log_marginal.mean()),
                     "is_k1000": float(importance.mean()),
                     "ais_minus_is": float(difference.mean()),
                     "se": float(difference.std()) / math.sqrt(len(difference))})
        print(dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ais_digits.json").write_text(dumps(rows, indent=2))


if __name__ == "__main__":
    main()
