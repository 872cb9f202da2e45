"""What a run of the command is: the named model and guide, their sizes and training."""

from __future__ import annotations

from dataclasses import dataclass, field

from ppl_vae.gradients import check_gradient
from ppl_vae.guides import DeltaEncoder, LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE, FactorAnalysis
from ppl_vae.models.vae import LIKELIHOODS
from ppl_vae.objectives import LR_SCHEDULES, OBJECTIVES
from ppl_vae.seeding import check_seed
from ppl_vae.validation import one_of, positive_int, positive_number

MODEL_CLASSES = {"vae": VAE, "ppca": PPCA, "fa": FactorAnalysis}
MODELS = tuple(MODEL_CLASSES)
GUIDES = ("mlp", "linear", "linear-full", "delta")
BINARY_DATASETS = ("binarized_mnist",)
BINARIZE = ("static", "dynamic")


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
    objective: str = "elbo"
    particles: int = 1
    gradient: str = "reparam"
    kl_warmup: int = 0
    lr_schedule: str = "constant"
    clip_norm: float = 0.0
    binarize: str = "static"
    data_dim: int = field(default=0)


def build_model(cfg: RunConfig):
    """The model named by ``cfg.model``."""
    if cfg.model == "vae":
        return VAE(cfg.data_dim, cfg.latent_dim, hidden=cfg.hidden, likelihood=cfg.likelihood)
    return MODEL_CLASSES[cfg.model](cfg.data_dim, cfg.latent_dim)


def build_guide(cfg: RunConfig):
    """The guide named by ``cfg.guide``."""
    if cfg.guide == "mlp":
        return MLPEncoder(cfg.data_dim, cfg.latent_dim, hidden=cfg.hidden)
    if cfg.guide == "delta":
        return DeltaEncoder(cfg.data_dim, cfg.latent_dim, hidden=cfg.hidden)
    covariance = "full" if cfg.guide == "linear-full" else "diag"
    return LinearEncoder(cfg.data_dim, cfg.latent_dim, covariance=covariance)


def check_config(cfg: RunConfig) -> None:
    """Refuse a configuration that could not train, before any work."""
    one_of(cfg.model, MODELS, "--model")
    one_of(cfg.guide, GUIDES, "--guide")
    one_of(cfg.likelihood, LIKELIHOODS, "--likelihood")
    one_of(cfg.objective, OBJECTIVES, "--objective")
    check_gradient(cfg.gradient, objective=cfg.objective, custom_loss=False,
                   kl_warmup=cfg.kl_warmup or None, flags=True)
    one_of(cfg.lr_schedule, LR_SCHEDULES, "--lr-schedule")
    one_of(cfg.binarize, BINARIZE, "--binarize")
    for name in ("latent_dim", "epochs", "batch_size", "particles"):
        positive_int(getattr(cfg, name), flag(name))
    if not (isinstance(cfg.kl_warmup, int) and cfg.kl_warmup >= 0):
        raise ValueError(f"--kl-warmup must be a number of steps >= 0, got {cfg.kl_warmup!r}")
    if cfg.binarize == "dynamic" and not (cfg.model == "vae" and cfg.likelihood == "bernoulli"
                                          and cfg.dataset not in BINARY_DATASETS):
        raise ValueError("--binarize dynamic needs --model vae with a bernoulli likelihood on "
                         "a dataset of intensities (mnist, fashion_mnist, digits)")
    if not cfg.hidden:
        raise ValueError("--hidden needs at least one layer width")
    for width in cfg.hidden:
        positive_int(width, "--hidden")
    positive_number(cfg.lr, "--lr")
    if cfg.clip_norm != 0:  # 0 is the default: no clipping
        positive_number(cfg.clip_norm, "--clip-norm")
    check_seed(cfg.seed, "--seed")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


