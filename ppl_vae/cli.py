"""The ``ppl-vae`` command: train a named model and guide, and measure the inference gaps.

    ppl-vae gaps                       # the main job: a VAE on the embedded digits
    ppl-vae fit --dataset binarized_mnist --data-root ../shared/data --epochs 10
    ppl-vae gaps --checkpoint runs/fit/checkpoint.pt
    ppl-vae surgery --checkpoint runs/fit/checkpoint.pt   # ELBO surgery, active units
    ppl-vae fit --checkpoint-every 500 --out runs/long   # interrupted? then:
    ppl-vae fit --resume runs/long

Every argument and the output folder are checked before any work; expected failures
(bad input, a missing or damaged file) are one line on stderr and exit status 2.

This is the one place in the library that names particular models and guides.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

import ppl_vae
from ppl_vae import checkpoint, json_output
from ppl_vae.checkpoint import CheckpointError, atomic_save
from ppl_vae.data import load_dataset
from ppl_vae.distributed import rank_and_size
from ppl_vae.gradients import GRADIENTS, check_gradient
from ppl_vae.guides import DeltaEncoder, LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE, FactorAnalysis
from ppl_vae.models.vae import LIKELIHOODS
from ppl_vae.objectives import LR_SCHEDULES, OBJECTIVES
from ppl_vae.seeding import check_seed
from ppl_vae.surgery import ACTIVE_THRESHOLD
from ppl_vae.train import Interrupted
from ppl_vae.validation import one_of, positive_int, positive_number

MODEL_CLASSES = {"vae": VAE, "ppca": PPCA, "fa": FactorAnalysis}
MODELS = tuple(MODEL_CLASSES)
GUIDES = ("mlp", "linear", "linear-full", "delta")
BINARY_DATASETS = ("binarized_mnist",)
BINARIZE = ("static", "dynamic")
DEFAULT_OUT = {"gaps": "runs/gaps", "fit": "runs/fit", "surgery": "runs/surgery"}
NUM_SAMPLES = 1000
# Draws per test point of ELBO surgery: each is scored under every test point's guide.
SURGERY_SAMPLES = 8
AIS_STEPS, AIS_CHAINS = 100, 16
LOCK_FILE = ".ppl-vae.lock"
# Keys every checkpoint of the command keeps (fit's training state sits beside them).
CHECKPOINT_KEYS = ("config", "model", "guide")


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


def rebuild(cfg: RunConfig, state: dict, path):
    """Model and guide of ``cfg`` with the checkpoint's parameters."""
    model, guide = build_model(cfg), build_guide(cfg)
    checkpoint.load_state(model, state["model"], "model", path)
    checkpoint.load_state(guide, state["guide"], "guide", path)
    return model, guide


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
          checkpoint_every=None, resume=False, x=None):
    """Build, fit and return ``(model, guide, cfg, seconds)`` for a configuration.

    With ``checkpoint_path`` the whole training state (and ``cfg``, under ``"config"``)
    is saved there every ``checkpoint_every`` steps, at the end and on SIGINT/SIGTERM;
    ``resume`` continues from it. ``x``: the training split, when already loaded.
    """
    if x is None:
        x = load_split(cfg, "train", root, training=True)
    cfg = RunConfig(**{**asdict(cfg), "data_dim": x.shape[1]})
    torch.manual_seed(cfg.seed)
    model, guide = build_model(cfg), build_guide(cfg)
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
        positive_int(getattr(cfg, name), _flag(name))
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class _Plan:
    """A command line resolved and checked: what to run, from where, into where."""

    cfg: RunConfig
    out: Path
    state: dict | None = None  # a loaded checkpoint (--checkpoint or --resume)
    source: Path | None = None  # its file


def plan(args) -> _Plan:
    """Resolve the configuration and check every argument and the output folder."""
    _check_eval_flags(args)
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
    return _Plan(cfg, out, state, None if source is None else Path(source))


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
            positive_int(value, _flag(name))


def _refuse_conflicts(args, cfg: RunConfig, source) -> None:
    """Flags given beside a checkpoint must agree with its configuration."""
    for name, value in _config_flags(args).items():
        saved = getattr(cfg, name)
        if value != saved:
            raise ValueError(f"{_flag(name)} {_shown(value)} conflicts with the checkpoint "
                             f"{source}, which has {_flag(name)} {_shown(saved)}")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _config_flags(args) -> dict:
    """The configuration flags the user gave (their parser default is None)."""
    names = [f.name for f in fields(RunConfig) if f.name != "data_dim"]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "hidden" in given:
        given["hidden"] = tuple(given["hidden"])
    return given


def check_writable(out: Path) -> None:
    """Create ``out`` and write a scratch file in it, or a one-line ValueError."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    for path in (out, *out.parents):
        if path.exists():
            break
        if path.is_symlink():  # it exists as a link, but not what it points to
            what = f"--out {out}" if path == out else f"--out {out} lies under {path}, which"
            raise ValueError(f"{what} is a dangling symlink (to {os.readlink(path)}, which "
                             "does not exist)")
    ancestor = next(parent for parent in (out, *out.parents) if parent.exists())
    if not ancestor.is_dir():
        raise ValueError(f"--out {out} lies under {ancestor}, which is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"--out {out} cannot be written: {error.strerror or error}") from None


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold an exclusive lock on ``out`` (``fcntl.flock`` of ``out/.ppl-vae.lock``) for a
    run, so that two runs never write the same files; the lock file names the holder's
    pid. Another run's lock is a one-line ValueError. Other ranks of a torchrun job
    write nothing and take no lock."""
    if not _writer():
        yield
        return
    # Read-write without truncation ("a+" would append every write).
    with os.fdopen(os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644), "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(f"--out {out} is in use by another ppl-vae run (pid {holder}); "
                             "wait for it to end, or give another --out") from None
        # Overwrite in place, then cut: a reader never sees an empty file.
        handle.seek(0)
        handle.write(f"{os.getpid()}\n")
        handle.truncate()
        handle.flush()
        yield  # closing the file releases the lock, also when the process dies


def _config_from(args) -> RunConfig:
    return RunConfig(**_config_flags(args))


def load_data(p: _Plan, args, training: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The training split (None when not ``training``) and the evaluation's test split,
    both read (and so every data file checked) before any work; the same width."""
    x_test = load_split(p.cfg, "test", args.data_root, limit=args.eval_limit)
    x_train = load_split(p.cfg, "train", args.data_root, training=True) if training else None
    width = x_train.shape[1] if training else p.cfg.data_dim
    if x_test.shape[1] != width:
        raise ValueError(f"the {p.cfg.dataset} test split has {x_test.shape[1]} columns but "
                         f"the model is for {width}: check the data files (--data-root)")
    return x_train, x_test


def cmd_fit(args) -> dict:
    p = plan(args)
    with exclusive(p.out):
        return _fit(p, args)


def _fit(p: _Plan, args) -> dict:
    resume = getattr(args, "resume", None) is not None
    evaluate_only = p.state is not None and not resume  # evaluate a saved model
    x_train, x = load_data(p, args, training=not evaluate_only)
    if evaluate_only:
        model, guide = rebuild(p.cfg, p.state, p.source)
        cfg, seconds = p.cfg, 0.0
        if _writer():
            save_checkpoint(p.out / "checkpoint.pt", model, guide, cfg)
    else:
        model, guide, cfg, seconds = train(
            p.cfg, args.data_root, progress=not args.quiet,
            checkpoint_path=p.out / "checkpoint.pt", checkpoint_every=args.checkpoint_every,
            resume=resume, x=x_train)
    num_samples = args.num_samples or NUM_SAMPLES
    d = ppl_vae.diagnostics(model, guide, x, num_samples, seed=cfg.seed)
    summary = {"train_seconds": round(seconds, 2), "test_points": len(x), **d.summary()}
    _surgery_table(model, guide, x, cfg, p.out, SURGERY_SAMPLES, ACTIVE_THRESHOLD)
    if not _writer():  # every rank has the same numbers; one prints and writes them
        return summary
    print(f"test ELBO      {summary['elbo']:.3f} +- {summary['elbo_se']:.3f} nats")
    print(f"test log p(x)  {summary['log_marginal']:.3f} +- {summary['log_marginal_se']:.3f} "
          f"nats (K={num_samples}, {len(x)} points)")
    print(f"checkpoint     {p.out / 'checkpoint.pt'}")
    (p.out / "fit.json").write_text(json_output.dumps(summary, indent=2))
    return summary


def cmd_gaps(args) -> dict:
    start = time.perf_counter()
    p = plan(args)
    with exclusive(p.out):
        return _gaps(p, args, start)


def _gaps(p: _Plan, args, start: float) -> dict:
    x_train, x = load_data(p, args, training=p.state is None)
    if p.state is not None:
        (model, guide), cfg, seconds = rebuild(p.cfg, p.state, p.source), p.cfg, 0.0
    else:
        model, guide, cfg, seconds = train(p.cfg, args.data_root, progress=not args.quiet,
                                           x=x_train)
    report = ppl_vae.gaps(model, guide, x, local=args.local,
                          num_samples=args.num_samples or NUM_SAMPLES, seed=cfg.seed,
                          log_px=args.log_px, ais_steps=args.ais_steps or AIS_STEPS,
                          ais_chains=args.ais_chains or AIS_CHAINS, progress=not args.quiet)
    if not _writer():
        return report.to_dict()
    print(report)
    (p.out / "gaps.json").write_text(report.to_json())
    _save_figure(report, p.out / "gaps.png")
    total = time.perf_counter() - start
    print(f"trained in {seconds:.1f} s; {total:.1f} s in all; wrote {p.out}/gaps.json, gaps.png")
    return report.to_dict()


def cmd_surgery(args) -> dict:
    start = time.perf_counter()
    threshold = ACTIVE_THRESHOLD if args.threshold is None else args.threshold
    positive_number(threshold, "--threshold")
    p = plan(args)
    if p.cfg.guide == "delta":
        raise ValueError("surgery needs an encoder with a density; --guide delta is a point "
                         "mass (use mlp, linear or linear-full)")
    if p.state is not None:
        (model, guide), cfg, seconds = rebuild(p.cfg, p.state, p.source), p.cfg, 0.0
    else:
        model, guide, cfg, seconds = train(p.cfg, args.data_root, progress=not args.quiet)
    x = load_split(cfg, "test", args.data_root, limit=args.eval_limit)
    report = _surgery_table(model, guide, x, cfg, p.out, args.num_samples or SURGERY_SAMPLES,
                            threshold)
    if _writer():
        total = time.perf_counter() - start
        print(f"trained in {seconds:.1f} s; {total:.1f} s in all; wrote {p.out}/surgery.json, "
              "surgery.png")
    return report.to_dict()


def _surgery_table(model, guide, x, cfg: RunConfig, out: Path, num_samples: int,
                   threshold: float):
    """ELBO surgery of the test data: printed, and written to surgery.json/.png (rank 0)."""
    report = ppl_vae.elbo_surgery(model, guide, x, num_samples=num_samples,
                                  threshold=threshold, seed=cfg.seed)
    if _writer():
        print(report)
        (out / "surgery.json").write_text(report.to_json())
        _save_figure(report, out / "surgery.png")
    return report


def _save_figure(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    ax = report.plot()
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")


def build_parser() -> argparse.ArgumentParser:
    """The parser. Configuration flags default to None, so a flag the user gave can be
    told from one left out (and checked against a loaded checkpoint's configuration);
    ``RunConfig`` holds the defaults."""
    parser = argparse.ArgumentParser(prog="ppl-vae", description=__doc__.splitlines()[0])
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
                       help=f"default {_shown(defaults.hidden)}")
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


def run(argv=None) -> dict:
    """Run a command line; returns its summary (what it also writes as JSON)."""
    return _dispatch(build_parser().parse_args(argv))


def _dispatch(args) -> dict:
    return {"gaps": cmd_gaps, "fit": cmd_fit, "surgery": cmd_surgery}[args.command](args)


def main(argv=None) -> None:
    """Console-script entry point.

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


def _writer() -> bool:
    """Rank 0 prints and writes; other ranks of a torchrun job only compute."""
    return rank_and_size()[0] == 0


@contextlib.contextmanager
def _process_group():
    """Under torchrun (WORLD_SIZE > 1 in the environment), the default process group:
    nccl when CUDA is available, gloo otherwise; destroyed on the way out."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
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


if __name__ == "__main__":
    main()
