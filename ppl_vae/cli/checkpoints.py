"""The command's checkpoints: a trained model and guide with the configuration that built them."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

from ppl_vae import checkpoint
from ppl_vae.checkpoint import CheckpointError, atomic_save
from ppl_vae.cli.config import RunConfig, build_guide, build_model, check_config

# Keys every checkpoint of the command keeps (fit's training state sits beside them).
CHECKPOINT_KEYS = ("config", "model", "guide")


def save_checkpoint(path: Path, model, guide, cfg: RunConfig) -> None:
    """Model and guide ``state_dict``s plus the configuration, written atomically."""
    atomic_save({"config": asdict(cfg), "model": model.state_dict(),
                 "guide": guide.state_dict()}, path)


def load_checkpoint(path: str | Path):
    """``(model, guide, config)`` rebuilt from a checkpoint written by ``ppl-vae fit``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointError
        A truncated, corrupted or mismatched file.
    """
    state = checkpoint.load(path, required=CHECKPOINT_KEYS)
    cfg = config_of(state, path)
    return *rebuild(cfg, state, path), cfg


def config_of(state: dict, path) -> RunConfig:
    """The ``RunConfig`` saved in a checkpoint, or a CheckpointError."""
    raw = state["config"]
    names = {f.name for f in fields(RunConfig)}
    if not isinstance(raw, dict) or not set(raw) <= names:
        raise CheckpointError(f"{path} holds no configuration that ppl-vae can read")
    try:
        cfg = RunConfig(**{**raw, "hidden": tuple(raw.get("hidden", ()))})
        check_config(cfg)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds a bad configuration: {error}") from error
    return cfg


def rebuild(cfg: RunConfig, state: dict, path, device="cpu"):
    """Model and guide of ``cfg`` with the checkpoint's parameters, on ``device``."""
    model, guide = build_model(cfg), build_guide(cfg)
    checkpoint.load_state(model, state["model"], "model", path)
    checkpoint.load_state(guide, state["guide"], "guide", path)
    return model.to(device), guide.to(device)


