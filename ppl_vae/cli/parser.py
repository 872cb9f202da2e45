"""The command's argument parser: three commands sharing the configuration flags."""

from __future__ import annotations

import argparse

from ppl_vae.cli.config import BINARIZE, GUIDES, MODELS, RunConfig
from ppl_vae.cli.fit import NUM_SAMPLES
from ppl_vae.cli.gaps import AIS_CHAINS, AIS_STEPS
from ppl_vae.cli.plan import DEFAULT_OUT, shown
from ppl_vae.cli.surgery import SURGERY_SAMPLES
from ppl_vae.gradients import GRADIENTS
from ppl_vae.models.vae import LIKELIHOODS
from ppl_vae.objectives import LR_SCHEDULES, OBJECTIVES
from ppl_vae.surgery import ACTIVE_THRESHOLD

DESCRIPTION = ("The ``ppl-vae`` command: train a named model and guide, and measure the "
               "inference gaps.")


def build_parser() -> argparse.ArgumentParser:
    """The parser. Configuration flags default to None, so a flag the user gave can be
    told from one left out (and checked against a loaded checkpoint's configuration);
    ``RunConfig`` holds the defaults."""
    parser = argparse.ArgumentParser(prog="ppl-vae", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = RunConfig()
    for name, help_text in [
        ("gaps", "train (or load) a model and guide, then measure the gaps on test data"),
        ("fit", "train a model and guide, save a checkpoint, print ELBO and log p(x)"),
        ("surgery", "train (or load) a model and guide, then split the test ELBO into "
         "reconstruction, mutual information and marginal KL, and count active units"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", choices=MODELS, help=f"default {defaults.model}")
        p.add_argument("--guide", choices=GUIDES, help=f"default {defaults.guide}")
        p.add_argument("--dataset", help="digits (embedded, the default), mnist, "
                       "fashion_mnist, binarized_mnist")
        p.add_argument("--data-root", default=None,
                       help="folder with the dataset files (else $PPL_VAE_DATA, then the cache)")
        p.add_argument("--latent-dim", type=int, help=f"default {defaults.latent_dim}")
        p.add_argument("--hidden", type=int, nargs="+",
                       help=f"default {shown(defaults.hidden)}")
        p.add_argument("--likelihood", choices=LIKELIHOODS,
                       help=f"--model vae only; default {defaults.likelihood}")
        p.add_argument("--epochs", type=int, help=f"default {defaults.epochs}")
        p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
        p.add_argument("--lr", type=float, help=f"default {defaults.lr}")
        p.add_argument("--seed", type=int, help=f"default {defaults.seed}")
        p.add_argument("--objective", choices=OBJECTIVES,
                       help=f"training objective (default {defaults.objective}); iwae is "
                       "the importance-weighted bound with --particles samples")
        p.add_argument("--particles", type=int,
                       help=f"samples per datapoint of the objective (default "
                       f"{defaults.particles})")
        p.add_argument("--gradient", choices=GRADIENTS,
                       help="gradient estimator (default reparam); stl for --objective "
                       "elbo, dreg for --objective iwae: same objective, lower variance")
        p.add_argument("--kl-warmup", type=int, metavar="STEPS",
                       help="steps over which the latent terms' weight rises to 1 "
                       f"(default {defaults.kl_warmup}: none)")
        p.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                       help=f"learning-rate decay over the run (default {defaults.lr_schedule})")
        p.add_argument("--clip-norm", type=float, metavar="NORM",
                       help="clip the gradient's 2-norm to NORM before each step "
                       f"(default {defaults.clip_norm}: no clipping)")
        p.add_argument("--binarize", choices=BINARIZE,
                       help="static: binarize the data once (seeded); dynamic: redraw the "
                       "training minibatches each step (test data stay static); default "
                       f"{defaults.binarize}")
        p.add_argument("--num-samples", type=int, default=None,
                       help="samples per test point (default "
                       f"{SURGERY_SAMPLES if name == 'surgery' else NUM_SAMPLES})")
        p.add_argument("--eval-limit", type=int, default=None,
                       help="evaluate on a fixed random subset of this many test points")
        p.add_argument("--checkpoint", default=None, help="start from a saved checkpoint")
        p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT[name]})")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--device", default="cpu",
                       help="where the model, guide and data live: cpu (default), cuda or "
                       "cuda:N; checkpoints are read on any device")
        if name == "gaps":
            p.add_argument("--local", choices=("diag", "full", "flow"), default=None,
                           help="family of the per-datapoint guides (default: the encoder's)")
            p.add_argument("--log-px", choices=("auto", "exact", "is", "ais"), default="auto",
                           help="how log p(x) is computed (default auto: exact where a "
                           "closed form exists, else importance sampling)")
            p.add_argument("--ais-steps", type=int, default=None,
                           help=f"AIS distributions for --log-px ais (default {AIS_STEPS})")
            p.add_argument("--ais-chains", type=int, default=None,
                           help=f"AIS chains per point for --log-px ais (default {AIS_CHAINS})")
        elif name == "surgery":
            p.add_argument("--threshold", type=float, default=None,
                           help="a latent dimension is active when Cov_x E_q[u|x] exceeds "
                           f"this (default {ACTIVE_THRESHOLD}, Burda et al.)")
        else:
            p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                           help="also write --out/checkpoint.pt every STEPS steps (it is "
                           "always written at the end and on SIGINT/SIGTERM)")
            p.add_argument("--resume", default=None, metavar="DIR",
                           help="finish the run saved in DIR/checkpoint.pt, then evaluate")
    return parser


