"""A command line resolved and checked before any work: configuration, checkpoint, folder."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ppl_vae import checkpoint
from ppl_vae.cli.checkpoints import CHECKPOINT_KEYS, config_of
from ppl_vae.cli.config import MODEL_CLASSES, RunConfig, check_config, flag
from ppl_vae.cli.folders import check_writable
from ppl_vae.cli.training import load_split
from ppl_vae.validation import positive_int

DEFAULT_OUT = {"gaps": "runs/gaps", "fit": "runs/fit", "surgery": "runs/surgery"}


@dataclass(frozen=True)
class Plan:
    """A command line resolved and checked: what to run, from where, into where."""

    cfg: RunConfig
    out: Path
    state: dict | None = None  # a loaded checkpoint (--checkpoint or --resume)
    source: Path | None = None  # its file
    device: torch.device = torch.device("cpu")


def plan(args) -> Plan:
    """Resolve the configuration and check every argument and the output folder."""
    _check_eval_flags(args)
    device = checked_device(args.device)
    resume = getattr(args, "resume", None)
    if resume is not None and args.checkpoint is not None:
        raise ValueError("give --resume DIR or --checkpoint FILE, not both")
    if resume is not None and args.out is not None and Path(args.out) != Path(resume):
        raise ValueError(f"--out {args.out} conflicts with --resume {resume}: a resumed "
                         "run writes into its own folder")
    source = Path(resume) / "checkpoint.pt" if resume is not None else args.checkpoint
    if source is None:
        cfg, state = _config_from(args), None
        check_config(cfg)
    else:
        state = checkpoint.load(source, required=CHECKPOINT_KEYS)
        cfg = config_of(state, source)
        _refuse_conflicts(args, cfg, source)
    if cfg.model != "vae" and args.likelihood is not None:
        raise ValueError(f"--likelihood applies to --model vae only, not --model {cfg.model}")
    _check_evaluation(args, cfg)
    out = Path(resume if resume is not None else args.out or DEFAULT_OUT[args.command])
    check_writable(out)
    return Plan(cfg, out, state, None if source is None else Path(source), device)


def checked_device(name: str) -> torch.device:
    """``--device`` as a torch.device, refused where it cannot run: not cpu or cuda[:N],
    no such GPU, or CUDA under torchrun (the command's process group is gloo, which
    gathers CPU tensors)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device takes cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA "
                         "devices (cuda:0 ...)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--device {name} under torchrun: the command's processes share "
                         "their results through gloo on the CPU; run one process with "
                         f"--device {name}, or several on the CPU")
    return device


def _check_evaluation(args, cfg: RunConfig) -> None:
    """Refuse, before training, what the evaluation after it would refuse."""
    if args.command == "gaps" and cfg.guide == "delta":
        raise ValueError("gaps needs a Gaussian encoder to fit local guides of its family; "
                         "--guide delta has none (use mlp, linear or linear-full)")
    if args.command == "fit" and cfg.guide == "delta":
        raise ValueError("fit evaluates the test ELBO and log p(x) with the guide as the "
                         "importance proposal; --guide delta is a point mass with no density "
                         "(use mlp, linear or linear-full)")
    closed = [name for name, cls in MODEL_CLASSES.items() if hasattr(cls, "marginal")]
    if getattr(args, "log_px", None) == "exact" and cfg.model not in closed:
        raise ValueError(f"--log-px exact needs a closed-form marginal p(x), which --model "
                         f"{cfg.model} has not (--model {' or '.join(closed)} has one); use "
                         "--log-px is or ais")


def _check_eval_flags(args) -> None:
    for name in ("num_samples", "eval_limit", "checkpoint_every", "ais_steps", "ais_chains"):
        value = getattr(args, name, None)
        if value is not None:
            positive_int(value, flag(name))


def _refuse_conflicts(args, cfg: RunConfig, source) -> None:
    """Flags given beside a checkpoint must agree with its configuration."""
    for name, value in _config_flags(args).items():
        saved = getattr(cfg, name)
        if value != saved:
            raise ValueError(f"{flag(name)} {shown(value)} conflicts with the checkpoint "
                             f"{source}, which has {flag(name)} {shown(saved)}")


def shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _config_flags(args) -> dict:
    """The configuration flags the user gave (their parser default is None)."""
    names = [f.name for f in fields(RunConfig) if f.name != "data_dim"]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "hidden" in given:
        given["hidden"] = tuple(given["hidden"])
    return given


def _config_from(args) -> RunConfig:
    return RunConfig(**_config_flags(args))


def load_data(p: Plan, args, training: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The training split (None when not ``training``) and the evaluation's test split,
    both read (and so every data file checked) before any work; the same width."""
    x_test = load_split(p.cfg, "test", args.data_root, limit=args.eval_limit)
    x_train = load_split(p.cfg, "train", args.data_root, training=True) if training else None
    width = x_train.shape[1] if training else p.cfg.data_dim
    if x_test.shape[1] != width:
        raise ValueError(f"the {p.cfg.dataset} test split has {x_test.shape[1]} columns but "
                         f"the model is for {width}: check the data files (--data-root)")
    return (None if x_train is None else x_train.to(p.device)), x_test.to(p.device)


