"""``ppl-vae fit``: train (or resume, or load) a model and guide, then score the test data."""

from __future__ import annotations

import ppl_vae
from ppl_vae import json_output
from ppl_vae.cli import training
from ppl_vae.cli.checkpoints import rebuild, save_checkpoint
from ppl_vae.cli.folders import exclusive, writer
from ppl_vae.cli.plan import Plan, load_data, plan
from ppl_vae.cli.surgery import SURGERY_SAMPLES, surgery_table
from ppl_vae.surgery import ACTIVE_THRESHOLD

NUM_SAMPLES = 1000


def cmd_fit(args) -> dict:
    p = plan(args)
    with exclusive(p.out):
        return _fit(p, args)


def _fit(p: Plan, args) -> dict:
    resume = getattr(args, "resume", None) is not None
    evaluate_only = p.state is not None and not resume  # evaluate a saved model
    x_train, x = load_data(p, args, training=not evaluate_only)
    if evaluate_only:
        model, guide = rebuild(p.cfg, p.state, p.source, p.device)
        cfg, seconds = p.cfg, 0.0
        if writer():
            save_checkpoint(p.out / "checkpoint.pt", model, guide, cfg)
    else:
        model, guide, cfg, seconds = training.train(
            p.cfg, args.data_root, progress=not args.quiet,
            checkpoint_path=p.out / "checkpoint.pt", checkpoint_every=args.checkpoint_every,
            resume=resume, x=x_train, device=p.device)
    num_samples = args.num_samples or NUM_SAMPLES
    d = ppl_vae.diagnostics(model, guide, x, num_samples, seed=cfg.seed)
    summary = {"train_seconds": round(seconds, 2), "test_points": len(x), **d.summary()}
    surgery_table(model, guide, x, cfg, p.out, SURGERY_SAMPLES, ACTIVE_THRESHOLD)
    if not writer():  # every rank has the same numbers; one prints and writes them
        return summary
    print(f"test ELBO      {summary['elbo']:.3f} +- {summary['elbo_se']:.3f} nats")
    print(f"test log p(x)  {summary['log_marginal']:.3f} +- {summary['log_marginal_se']:.3f} "
          f"nats (K={num_samples}, {len(x)} points)")
    print(f"checkpoint     {p.out / 'checkpoint.pt'}")
    (p.out / "fit.json").write_text(json_output.dumps(summary, indent=2))
    return summary


