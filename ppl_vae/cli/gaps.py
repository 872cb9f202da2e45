"""``ppl-vae gaps``: train (or load) a model and guide, then measure the gaps on test data."""

from __future__ import annotations

import time

import ppl_vae
from ppl_vae.cli import training
from ppl_vae.cli.checkpoints import rebuild
from ppl_vae.cli.fit import NUM_SAMPLES
from ppl_vae.cli.folders import exclusive, save_figure, writer
from ppl_vae.cli.plan import Plan, load_data, plan

AIS_STEPS, AIS_CHAINS = 100, 16


def cmd_gaps(args) -> dict:
    start = time.perf_counter()
    p = plan(args)
    with exclusive(p.out):
        return _gaps(p, args, start)


def _gaps(p: Plan, args, start: float) -> dict:
    x_train, x = load_data(p, args, training=p.state is None)
    if p.state is not None:
        (model, guide), cfg, seconds = rebuild(p.cfg, p.state, p.source, p.device), p.cfg, 0.0
    else:
        model, guide, cfg, seconds = training.train(p.cfg, args.data_root, progress=not args.quiet,
                                                    x=x_train, device=p.device)
    report = ppl_vae.gaps(model, guide, x, local=args.local,
                          num_samples=args.num_samples or NUM_SAMPLES, seed=cfg.seed,
                          log_px=args.log_px, ais_steps=args.ais_steps or AIS_STEPS,
                          ais_chains=args.ais_chains or AIS_CHAINS, progress=not args.quiet)
    if not writer():
        return report.to_dict()
    print(report)
    (p.out / "gaps.json").write_text(report.to_json())
    save_figure(report, p.out / "gaps.png")
    total = time.perf_counter() - start
    print(f"trained in {seconds:.1f} s; {total:.1f} s in all; wrote {p.out}/gaps.json, gaps.png")
    return report.to_dict()


