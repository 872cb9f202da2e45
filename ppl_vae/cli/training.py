"""The command's data and training: a configured split, and a configured fit."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

import ppl_vae
from ppl_vae.cli.config import BINARY_DATASETS, RunConfig, build_guide, build_model
from ppl_vae.data import load_dataset


def load_split(cfg: RunConfig, split: str, root, limit=None, training=False) -> torch.Tensor:
    """A split of the configured dataset, binarized once (seeded) for a Bernoulli VAE;
    the intensities when ``training`` with ``binarize="dynamic"`` (fit redraws them)."""
    binary = cfg.model == "vae" and cfg.likelihood == "bernoulli"
    binarize = "static" if binary and cfg.dataset not in BINARY_DATASETS else None
    if training and cfg.binarize == "dynamic":
        binarize = None
    return load_dataset(cfg.dataset, split, root=root, binarize=binarize, limit=limit,
                        seed=cfg.seed)


def train(cfg: RunConfig, root, progress: bool = True, *, checkpoint_path=None,
          checkpoint_every=None, resume=False, x=None, device="cpu"):
    """Build, fit and return ``(model, guide, cfg, seconds)`` for a configuration.

    With ``checkpoint_path`` the whole training state (and ``cfg``, under ``"config"``)
    is saved there every ``checkpoint_every`` steps, at the end and on SIGINT/SIGTERM;
    ``resume`` continues from it. ``x``: the training split, when already loaded.
    The model, guide and data live on ``device``; the networks are initialized on the
    CPU first, so a seed gives the same starting weights on every device.
    """
    if x is None:
        x = load_split(cfg, "train", root, training=True)
    x = x.to(device)
    cfg = RunConfig(**{**asdict(cfg), "data_dim": x.shape[1]})
    torch.manual_seed(cfg.seed)
    model, guide = build_model(cfg).to(device), build_guide(cfg).to(device)
    extra = {"config": asdict(cfg)} if checkpoint_path is not None else None
    start = time.perf_counter()
    ppl_vae.fit(model, guide, x, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                seed=cfg.seed, progress=progress, checkpoint=checkpoint_path,
                checkpoint_every=checkpoint_every, resume=resume, checkpoint_extra=extra,
                objective=cfg.objective, num_particles=cfg.particles, gradient=cfg.gradient,
                kl_warmup=cfg.kl_warmup or None, lr_schedule=cfg.lr_schedule,
                clip_norm=cfg.clip_norm or None,
                binarize="dynamic" if cfg.binarize == "dynamic" else None)
    return model, guide, cfg, time.perf_counter() - start


