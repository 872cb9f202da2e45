"""``ppl-vae surgery``: the test ELBO split into reconstruction, mutual information and
marginal KL, and the active units."""

from __future__ import annotations

import time
from pathlib import Path

import ppl_vae
from ppl_vae.cli import training
from ppl_vae.cli.checkpoints import rebuild
from ppl_vae.cli.config import RunConfig
from ppl_vae.cli.folders import save_figure, writer
from ppl_vae.cli.plan import plan
from ppl_vae.surgery import ACTIVE_THRESHOLD
from ppl_vae.validation import positive_number

# Draws per test point of ELBO surgery: each is scored under every test point's guide.
SURGERY_SAMPLES = 8


def cmd_surgery(args) -> dict:
    start = time.perf_counter()
    threshold = ACTIVE_THRESHOLD if args.threshold is None else args.threshold
    positive_number(threshold, "--threshold")
    p = plan(args)
    if p.cfg.guide == "delta":
        raise ValueError("surgery needs an encoder with a density; --guide delta is a point "
                         "mass (use mlp, linear or linear-full)")
    if p.state is not None:
        (model, guide), cfg, seconds = rebuild(p.cfg, p.state, p.source, p.device), p.cfg, 0.0
    else:
        model, guide, cfg, seconds = training.train(p.cfg, args.data_root, progress=not args.quiet,
                                                    device=p.device)
    x = training.load_split(cfg, "test", args.data_root, limit=args.eval_limit).to(p.device)
    report = surgery_table(model, guide, x, cfg, p.out, args.num_samples or SURGERY_SAMPLES,
                            threshold)
    if writer():
        total = time.perf_counter() - start
        print(f"trained in {seconds:.1f} s; {total:.1f} s in all; wrote {p.out}/surgery.json, "
              "surgery.png")
    return report.to_dict()


def surgery_table(model, guide, x, cfg: RunConfig, out: Path, num_samples: int,
                   threshold: float):
    """ELBO surgery of the test data: printed, and written to surgery.json/.png (rank 0)."""
    report = ppl_vae.elbo_surgery(model, guide, x, num_samples=num_samples,
                                  threshold=threshold, seed=cfg.seed)
    if writer():
        print(report)
        (out / "surgery.json").write_text(report.to_json())
        save_figure(report, out / "surgery.png")
    return report


