"""The ``ppl-vae`` command: train a named model and guide, and measure the inference gaps.

    ppl-vae gaps                       # the main job: a VAE on the embedded digits
    ppl-vae fit --dataset binarized_mnist --data-root ../shared/data --epochs 10
    ppl-vae gaps --checkpoint runs/fit/checkpoint.pt

This is the one place in the library that names particular models and guides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import ppl_vae
from ppl_vae.guides import DeltaEncoder, LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE, FactorAnalysis
from ppl_vae.data import load_dataset

MODELS = ("vae", "ppca", "fa")
GUIDES = ("mlp", "linear", "linear-full", "delta")
BINARY_DATASETS = ("binarized_mnist",)


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a trained model and guide (saved in checkpoints)."""

    model: str = "vae"
    guide: str = "mlp"
    dataset: str = "digits"
    latent_dim: int = 8
    hidden: tuple[int, ...] = (200, 200)
    likelihood: str = "bernoulli"
    epochs: int = 200
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    data_dim: int = field(default=0)


def build_model(cfg: RunConfig):
    """The model named by ``cfg.model``."""
    if cfg.model == "vae":
        return VAE(cfg.data_dim, cfg.latent_dim, hidden=cfg.hidden, likelihood=cfg.likelihood)
    return {"ppca": PPCA, "fa": FactorAnalysis}[cfg.model](cfg.data_dim, cfg.latent_dim)


def build_guide(cfg: RunConfig):
    """The guide named by ``cfg.guide``."""
    if cfg.guide == "mlp":
        return MLPEncoder(cfg.data_dim, cfg.latent_dim, hidden=cfg.hidden)
    if cfg.guide == "delta":
        return DeltaEncoder(cfg.data_dim, cfg.latent_dim, hidden=cfg.hidden)
    covariance = "full" if cfg.guide == "linear-full" else "diag"
    return LinearEncoder(cfg.data_dim, cfg.latent_dim, covariance=covariance)


def save_checkpoint(path: Path, model, guide, cfg: RunConfig) -> None:
    """Model and guide ``state_dict``s plus the configuration, with ``torch.save``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"config": asdict(cfg), "model": model.state_dict(), "guide": guide.state_dict()}, path
    )


def load_checkpoint(path: str | Path):
    """``(model, guide, config)`` rebuilt from a checkpoint written by ``ppl-vae fit``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    raw = state["config"]
    cfg = RunConfig(**{**raw, "hidden": tuple(raw["hidden"])})
    model, guide = build_model(cfg), build_guide(cfg)
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    return model, guide, cfg


def load_split(cfg: RunConfig, split: str, root, limit=None) -> torch.Tensor:
    """A split of the configured dataset, binarized once (seeded) for a Bernoulli VAE."""
    binary = cfg.model == "vae" and cfg.likelihood == "bernoulli"
    binarize = "static" if binary and cfg.dataset not in BINARY_DATASETS else None
    return load_dataset(cfg.dataset, split, root=root, binarize=binarize, limit=limit,
                        seed=cfg.seed)


def train(cfg: RunConfig, root, progress: bool = True):
    """Build, fit and return ``(model, guide, cfg, seconds)`` for a configuration."""
    x = load_split(cfg, "train", root)
    cfg = RunConfig(**{**asdict(cfg), "data_dim": x.shape[1]})
    torch.manual_seed(cfg.seed)
    model, guide = build_model(cfg), build_guide(cfg)
    start = time.perf_counter()
    ppl_vae.fit(model, guide, x, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                seed=cfg.seed, progress=progress)
    return model, guide, cfg, time.perf_counter() - start


def _config_from(args) -> RunConfig:
    return RunConfig(model=args.model, guide=args.guide, dataset=args.dataset,
                     latent_dim=args.latent_dim, hidden=tuple(args.hidden),
                     likelihood=args.likelihood, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, seed=args.seed)


def _trained(args):
    if args.checkpoint:
        model, guide, cfg = load_checkpoint(args.checkpoint)
        return model, guide, cfg, 0.0
    return train(_config_from(args), args.data_root, progress=not args.quiet)


def cmd_fit(args) -> dict:
    model, guide, cfg, seconds = _trained(args)
    out = Path(args.out)
    save_checkpoint(out / "checkpoint.pt", model, guide, cfg)
    x = load_split(cfg, "test", args.data_root, limit=args.eval_limit)
    d = ppl_vae.diagnostics(model, guide, x, args.num_samples, seed=cfg.seed)
    summary = {"train_seconds": round(seconds, 2), "test_points": len(x), **d.summary()}
    print(f"test ELBO      {summary['elbo']:.3f} +- {summary['elbo_se']:.3f} nats")
    print(f"test log p(x)  {summary['log_marginal']:.3f} +- {summary['log_marginal_se']:.3f} "
          f"nats (K={args.num_samples}, {len(x)} points)")
    print(f"checkpoint     {out / 'checkpoint.pt'}")
    (out / "fit.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_gaps(args) -> dict:
    start = time.perf_counter()
    model, guide, cfg, seconds = _trained(args)
    x = load_split(cfg, "test", args.data_root, limit=args.eval_limit)
    report = ppl_vae.gaps(model, guide, x, local=args.local, num_samples=args.num_samples,
                          seed=cfg.seed, progress=not args.quiet)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gaps.json").write_text(report.to_json())
    _save_figure(report, out / "gaps.png")
    total = time.perf_counter() - start
    print(f"trained in {seconds:.1f} s; {total:.1f} s in all; wrote {out}/gaps.json, gaps.png")
    return report.to_dict()


def _save_figure(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    ax = report.plot()
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-vae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = RunConfig()
    for name, help_text, out in [
        ("gaps", "train (or load) a model and guide, then measure the gaps on test data",
         "runs/gaps"),
        ("fit", "train a model and guide, save a checkpoint, print ELBO and log p(x)",
         "runs/fit"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", choices=MODELS, default=defaults.model)
        p.add_argument("--guide", choices=GUIDES, default=defaults.guide)
        p.add_argument("--dataset", default=defaults.dataset,
                       help="digits (embedded), mnist, fashion_mnist, binarized_mnist")
        p.add_argument("--data-root", default=None,
                       help="folder with the dataset files (else $PPL_VAE_DATA, then the cache)")
        p.add_argument("--latent-dim", type=int, default=defaults.latent_dim)
        p.add_argument("--hidden", type=int, nargs="+", default=list(defaults.hidden))
        p.add_argument("--likelihood", choices=("bernoulli", "gaussian"),
                       default=defaults.likelihood)
        p.add_argument("--epochs", type=int, default=defaults.epochs)
        p.add_argument("--batch-size", type=int, default=defaults.batch_size)
        p.add_argument("--lr", type=float, default=defaults.lr)
        p.add_argument("--seed", type=int, default=defaults.seed)
        p.add_argument("--num-samples", type=int, default=1000,
                       help="importance samples per test point for log p(x)")
        p.add_argument("--eval-limit", type=int, default=None,
                       help="evaluate on a fixed random subset of this many test points")
        p.add_argument("--checkpoint", default=None, help="start from a saved checkpoint")
        p.add_argument("--out", default=out, help="output folder")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "gaps":
            p.add_argument("--local", choices=("diag", "full"), default=None,
                           help="family of the per-datapoint guides (default: the encoder's)")
    return parser


def run(argv=None) -> dict:
    """Run a command line; returns its summary (what it also writes as JSON)."""
    args = build_parser().parse_args(argv)
    return {"gaps": cmd_gaps, "fit": cmd_fit}[args.command](args)


def main(argv=None) -> None:
    """Console-script entry point: bad input is reported in one line, exit status 2."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"ppl-vae: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
