"""The entry points: ``console`` (the ``ppl-vae`` command), ``main`` (a command line with
its exit statuses) and ``run`` (a command line in-process, returning its summary)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import torch.distributed as dist

from ppl_vae.cli.fit import cmd_fit
from ppl_vae.cli.freed_pages import keep_freed_pages
from ppl_vae.cli.gaps import cmd_gaps
from ppl_vae.cli.parser import build_parser
from ppl_vae.cli.surgery import cmd_surgery
from ppl_vae.train import Interrupted


def run(argv=None) -> dict:
    """Run a command line; returns its summary (what it also writes as JSON)."""
    return _dispatch(build_parser().parse_args(argv))


def _dispatch(args) -> dict:
    return {"gaps": cmd_gaps, "fit": cmd_fit, "surgery": cmd_surgery}[args.command](args)


def console() -> None:
    """The ``ppl-vae`` command: :func:`main` on ``sys.argv``, in a process that keeps the
    memory it frees (:mod:`ppl_vae.cli.freed_pages`)."""
    keep_freed_pages()
    main()


def main(argv=None) -> None:
    """Run a command line (``sys.argv`` when ``argv`` is None), as the command does.

    Expected failures (bad input, missing or damaged files, an unwritable output
    folder) are one line on stderr and exit status 2; an interruption by SIGINT or
    SIGTERM says where the checkpoint is and exits 130 or 143; anything else keeps its
    traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        with _process_group():
            _dispatch(args)
    except Interrupted as stop:
        print(_interrupted_message(stop, args), file=sys.stderr)
        raise SystemExit(128 + stop.signal) from None
    except KeyboardInterrupt:
        print("ppl-vae: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        print(f"ppl-vae: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def _process_group():
    """Under torchrun (WORLD_SIZE > 1 in the environment), the default process group,
    destroyed on the way out. gloo, also where CUDA is available: the command line builds
    its models on the CPU, and nccl reduces CUDA tensors only (DDP refuses CPU
    parameters under it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _interrupted_message(stop: Interrupted, args) -> str:
    name = signal.Signals(stop.signal).name
    message = f"ppl-vae: interrupted by {name} after step {stop.step}"
    if stop.checkpoint is None:
        return f"{message}; nothing saved (ppl-vae fit keeps a resumable checkpoint)"
    message += f"; checkpoint written to {stop.checkpoint}"
    resume = f"ppl-vae fit --resume {stop.checkpoint.parent}"
    if args.data_root is not None:
        resume += f" --data-root {args.data_root}"
    return f"{message}\nppl-vae: to continue: {resume}"
