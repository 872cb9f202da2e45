"""The ``ppl-vae`` command: train a named model and guide, and measure the inference gaps.

    ppl-vae gaps                       # the main job: a VAE on the embedded digits
    ppl-vae fit --dataset binarized_mnist --data-root ../shared/data --epochs 10
    ppl-vae gaps --checkpoint runs/fit/checkpoint.pt
    ppl-vae surgery --checkpoint runs/fit/checkpoint.pt   # ELBO surgery, active units
    ppl-vae fit --checkpoint-every 500 --out runs/long   # interrupted? then:
    ppl-vae fit --resume runs/long

Every argument and the output folder are checked before any work; expected failures
(bad input, a missing or damaged file) are one line on stderr and exit status 2.

This is the one place in the library that names particular models and guides. One idea
per file: :mod:`~ppl_vae.cli.config` (what a run is), :mod:`~ppl_vae.cli.checkpoints`,
:mod:`~ppl_vae.cli.training`, :mod:`~ppl_vae.cli.plan` (a command line checked),
:mod:`~ppl_vae.cli.folders` (the output folder), one module per command
(:mod:`~ppl_vae.cli.fit`, :mod:`~ppl_vae.cli.gaps`, :mod:`~ppl_vae.cli.surgery`),
:mod:`~ppl_vae.cli.parser`, :mod:`~ppl_vae.cli.freed_pages` (the command's memory) and
:mod:`~ppl_vae.cli.entry` (``console``, ``main``).
"""

import ppl_vae  # noqa: F401  (tests and users reach ppl_vae.fit through the command)
from ppl_vae.cli import training
from ppl_vae.cli.checkpoints import load_checkpoint, save_checkpoint
from ppl_vae.cli.config import RunConfig
from ppl_vae.cli.entry import console, main, run
from ppl_vae.cli.folders import LOCK_FILE, check_writable, exclusive
from ppl_vae.cli.parser import build_parser
from ppl_vae.cli.surgery import SURGERY_SAMPLES
from ppl_vae.cli.training import load_split

__all__ = [
    "LOCK_FILE", "SURGERY_SAMPLES", "RunConfig", "build_parser", "check_writable", "console",
    "exclusive",
    "load_checkpoint", "load_split", "main", "run", "save_checkpoint", "training",
]
