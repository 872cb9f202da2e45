"""Does gradient clipping save the flow encoder's Adam 3e-3 run on MNIST?

In ``cremer_table.py``'s run, the paper's VAE with a flow encoder, trained by the ELBO
with Adam 3e-3 and a cosine decay, diverged at epoch 37 (epoch-mean training ELBO -99.9
to -1790) and was back at -100 only at epoch 150; at 1e-3 it trained to -90.1. This
benchmark asks whether ``fit(clip_norm=...)`` lets it train at 3e-3:

1. a probe: a few hundred unclipped steps from the same initial weights, recording the
   gradient's 2-norm after each step; the bound is ``--clip-factor`` times the median of
   the probe's second half;
2. the full run from the same initial weights and seed with that bound, recording each
   epoch's training ELBO and the share of steps the bound rescaled.

It prints both beside the unclipped runs of the Cremer store (``--reference``) and stores
everything in ``<out>/results.json``; training is checkpointed, so a stopped run resumes.

    python -m benchmarks.clip_divergence --data-root ../shared/data \
        --reference runs/cremer2/results.json --out runs/clip
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import ppl_vae
from benchmarks.cremer_table import build, load
from benchmarks.store import opened

# The Cremer store's keys of the unclipped runs, and what to call them.
REFERENCES = {"mnist/flow/e150-lr0.003-cosine/train": "unclipped, 3e-3",
              "mnist/flow/e150-lr0.001-cosine/train": "unclipped, 1e-3"}


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    out, store = opened(args, "results.json")
    x = load("mnist", "train", SimpleNamespace(data_root=args.data_root))
    # Keys name what their values depend on, so a changed option is measured afresh.
    probe_tag = f"probe{args.probe_steps}-lr{args.lr:g}"
    store.run(probe_tag, partial(probe, x, args))
    bound = args.clip_factor * store.results[probe_tag]["median_norm"]
    tag = (f"clip{args.clip_factor:g}x{probe_tag}/"
           f"e{args.epochs}-lr{args.lr:g}-{args.lr_schedule}")
    store.run(tag, partial(train_clipped, x, bound, tag, args, out))
    report(store.results[tag], bound, args)


def grad_norm(params) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def probe(x, args) -> dict:
    """Gradient norms of unclipped steps from the full run's initial weights."""
    model, encoder = build("flow")
    params = [*model.parameters(), *encoder.parameters()]
    norms = []
    ppl_vae.fit(model, encoder, x, num_steps=args.probe_steps, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, progress=False,
                callback=lambda step, elbo: norms.append(grad_norm(params)))
    late = norms[len(norms) // 2:]
    return {"steps": args.probe_steps, "median_norm": float(np.median(late)),
            "max_norm": float(np.max(late)), "norms": norms}


def train_clipped(x, bound, tag, args, out: Path) -> dict:
    """The full run with ``clip_norm=bound``; a step counts as clipped when the gradient
    left after it has the bound's norm."""
    model, encoder = build("flow")
    params = [*model.parameters(), *encoder.parameters()]
    clipped = []
    path = out / f"{tag.replace('/', '_')}.ckpt"
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    result = ppl_vae.fit(
        model, encoder, x, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule, clip_norm=bound, seed=args.seed, progress=False,
        checkpoint=path, checkpoint_every=10 * steps_per_epoch, resume=path.exists(),
        callback=lambda step, elbo: clipped.append(grad_norm(params) >= bound * (1 - 1e-3)))
    return {"clip_norm": bound, "epochs": args.epochs,
            "epoch_elbo": result.history.reshape(args.epochs, -1).mean(1).tolist(),
            "final_train_elbo": result.final_elbo,
            # Steps of this call only: a resumed run counts from where it resumed.
            "share_clipped": float(np.mean(clipped)) if clipped else None}


def report(run: dict, bound: float, args) -> None:
    curves = {f"clipped at {bound:.0f}, {args.lr:g}": run["epoch_elbo"]}
    if args.reference and Path(args.reference).exists():
        stored = json.loads(Path(args.reference).read_text())
        curves.update({name: stored[key]["epoch_elbo"] for key, name in REFERENCES.items()
                       if key in stored})
    share = run["share_clipped"]
    print(f"clip_norm {bound:.1f}; steps clipped: "
          f"{'n/a' if share is None else f'{100 * share:.1f}%'}")
    width = max(len(name) for name in curves) + 2
    print(f"{'epoch':>6s}" + "".join(f"{name:>{width}s}" for name in curves))
    for epoch in (1, 10, 20, 30, 40, 45, 50, 60, 80, 100, 125, 150):
        if epoch <= min(len(c) for c in curves.values()):
            print(f"{epoch:6d}" + "".join(f"{c[epoch - 1]:{width}.2f}" for c in curves.values()))
    # The lowest epoch after the first 5 is where a divergence shows.
    print("lowest epoch ELBO after epoch 5: "
          + ", ".join(f"{name} {min(c[5:], default=math.nan):.2f}"
                      for name, c in curves.items()))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lr-schedule", default="cosine")
    parser.add_argument("--probe-steps", type=int, default=500)
    parser.add_argument("--clip-factor", type=float, default=2.0,
                        help="the bound over the probe's median gradient norm")
    parser.add_argument("--reference", default=None,
                        help="the Cremer store with the unclipped runs' epoch ELBOs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/clip")
    return parser


if __name__ == "__main__":
    main()
