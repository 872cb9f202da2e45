"""Step schedules of fit_local("flow"): seconds, steps and the fitted guide's ELBO, paired.

    python -m benchmarks.fit_local_schedule --checkpoint /tmp/mnist_vae_60.pt \
        --data-root ../shared/data [--points 24] [--candidates default,stl_cos800,...] \
        [--init prior|encoder] [--encoder /tmp/enc.pt] [--family flow] [--no-ref-again]

Each candidate is a set of fit_local settings (``lr``, ``num_particles``, ``window``,
``tol``, ``steps``; fit_local_trusted's ``sticking`` and ``anneal``) and of the plateau
rule's constants in ``ppl_vae.row_convergence`` (``LR_DECAY``, ``LR_DECAYS``,
``MEASURES``, ``PATIENCE``), patched for its fit only. All run in this one process, on
the first ``--points`` binarized MNIST test points (``load_dataset(..., seed=0)``), one
after the other (the reference ``ref`` first, and again last to see the timing drift;
the best of its times is the ratios' denominator). ``ref`` is fit_local as it was before
issue 21 (3000 steps of the plain gradient under the plateau rule alone), written out
here so that a changed default does not move it; ``default`` is this tree's.

Every fitted guide is scored with ``ppl_vae.elbo`` at ``--num-samples`` draws per point
under one seed, the same draws for every guide, and paired per point against ``ref``.
Reported: seconds, the fit's steps, the mean steps a row ran, mean decays per row, ELBO
and the paired difference with its standard error; JSON (with each window's mean ELBO,
rows left and decays) to ``--out``. ``--init encoder`` starts every fit from an
``MLPEncoder(784, 50, (200, 200))`` saved as ``{"encoder": state_dict}`` (gaps' start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

# fit_local's settings before this study (ppl_vae/row_convergence.py, local_fit.py).
REFERENCE = {"lr": 3e-2, "num_particles": 8, "window": 50, "tol": 1e-3, "steps": 3000,
             "sticking": False, "anneal": False,
             "LR_DECAY": 3.0, "LR_DECAYS": 4, "MEASURES": 5, "PATIENCE": 5}
FIT_ARGS = ("lr", "num_particles", "window", "tol", "steps", "sticking", "anneal")
CONSTANTS = ("LR_DECAY", "LR_DECAYS", "MEASURES", "PATIENCE")


def candidates() -> dict[str, dict]:
    """name -> settings that differ from REFERENCE (``stl``: sticking the landing;
    ``cos``: the rates follow a cosine to zero over ``steps``)."""
    table = {"ref": {}, "default": None}  # None: whatever fit_local's defaults are here
    for lr in (1e-2, 5e-3, 6e-2, 1e-1):
        table[f"lr{lr:g}"] = {"lr": lr}
    for tol in (3e-3, 1e-2):
        table[f"tol{tol:g}"] = {"tol": tol}
        table[f"tol{tol:g}_pat3"] = {"tol": tol, "PATIENCE": 3}
    for particles in (4, 16):
        table[f"p{particles}"] = {"num_particles": particles}
    table |= {
        "pat3": {"PATIENCE": 3},
        "cap1500": {"steps": 1500},
        "pat3_dec10x2": {"PATIENCE": 3, "LR_DECAY": 10.0, "LR_DECAYS": 2},
        "w30_pat3": {"window": 30, "MEASURES": 3, "PATIENCE": 3},
        "lr6e-2_dec5x3": {"lr": 6e-2, "LR_DECAY": 5.0, "LR_DECAYS": 3},
        "lr1e-2_pat3": {"lr": 1e-2, "PATIENCE": 3},
        "lr1e-2_dec3x3": {"lr": 1e-2, "LR_DECAYS": 3},
        "lr1e-2_dec3x2": {"lr": 1e-2, "LR_DECAYS": 2},
        "lr1e-2_dec10x2": {"lr": 1e-2, "LR_DECAY": 10.0, "LR_DECAYS": 2},
        "lr1e-2_pat3_dec10x2": {"lr": 1e-2, "PATIENCE": 3, "LR_DECAY": 10.0, "LR_DECAYS": 2},
        "lr1e-2_pat3_dec5x2": {"lr": 1e-2, "PATIENCE": 3, "LR_DECAY": 5.0, "LR_DECAYS": 2},
        "lr1e-2_w30_pat3": {"lr": 1e-2, "window": 30, "MEASURES": 3, "PATIENCE": 3},
        "p16_lr1e-2_pat3": {"num_particles": 16, "lr": 1e-2, "PATIENCE": 3},
        "stl": {"sticking": True},
        "stl_pat3": {"sticking": True, "PATIENCE": 3},
        "stl_lr1e-2_pat3": {"sticking": True, "lr": 1e-2, "PATIENCE": 3},
        "stl_cap1500": {"sticking": True, "steps": 1500},
    }
    for steps in (1500, 1200):
        table[f"cos{steps}"] = {"steps": steps, "anneal": True}
    table["cos1500_lr1e-2"] = {"steps": 1500, "anneal": True, "lr": 1e-2}
    for steps in (1500, 1200, 1000, 800, 600):
        table[f"stl_cos{steps}"] = {"sticking": True, "steps": steps, "anneal": True}
    table["stl_p4_cos1000"] = {"sticking": True, "steps": 1000, "anneal": True,
                               "num_particles": 4}
    table["stl_cos1000_lr1e-2"] = {"sticking": True, "steps": 1000, "anneal": True,
                                   "lr": 1e-2}
    return table


@contextlib.contextmanager
def patched(settings: dict):
    """The plateau rule's module constants set to ``settings`` for the block's length."""
    import ppl_vae.row_convergence as rc

    old = {name: getattr(rc, name) for name in CONSTANTS}
    try:
        for name in CONSTANTS:
            setattr(rc, name, settings[name])
        yield
    finally:
        for name, value in old.items():
            setattr(rc, name, value)


class Recording:
    """Patches local_fit's RowPlateau with a subclass that keeps the last instance and
    the mean ELBO, rows left and decays at each window."""

    def __enter__(self):
        import ppl_vae.local_fit as local_fit
        from ppl_vae.row_convergence import RowPlateau

        self.module, self.original, recorder = local_fit, local_fit.RowPlateau, self

        class Recorded(RowPlateau):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                recorder.schedule = self
                recorder.trace = []

            def _check(self, now):
                super()._check(now)
                opt = self._optimizer
                recorder.trace.append({"step": int(opt.row_steps.max()),
                                       "elbo": float(now.mean()),
                                       "active": int(opt.active.sum()),
                                       "decays": float(self.decays.double().mean())})

        local_fit.RowPlateau = Recorded
        return self

    def __exit__(self, *exc):
        self.module.RowPlateau = self.original


def load(args):
    import torch

    import ppl_vae
    from ppl_vae.models import VAE

    model = VAE(784, args.latent_dim, hidden=tuple(args.hidden))
    model.load_state_dict(torch.load(args.checkpoint)["model"])
    x = ppl_vae.load_dataset("binarized_mnist", "test", root=args.data_root,
                             limit=args.points, seed=0)
    encoder = None
    if args.init == "encoder":
        from ppl_vae.guides import MLPEncoder

        encoder = MLPEncoder(784, args.latent_dim, hidden=tuple(args.hidden[::-1]))
        encoder.load_state_dict(torch.load(args.encoder)["encoder"])
    return model, x, encoder


def run(model, x, encoder, name, changes, args) -> dict:
    """One timed fit with settings REFERENCE + ``changes`` (None: this tree's defaults)."""
    import inspect

    import ppl_vae.local_fit as local_fit
    import ppl_vae.row_convergence as rc

    if changes is None:
        defaults = inspect.signature(local_fit.fit_local).parameters
        trusted = inspect.signature(local_fit.fit_local_trusted).parameters
        settings = {key: (defaults if key in defaults else trusted)[key].default
                    for key in FIT_ARGS}
        settings |= {name: getattr(rc, name) for name in CONSTANTS}
    else:
        settings = REFERENCE | changes
    fit_args = {key: settings[key] for key in FIT_ARGS}
    with patched(settings), Recording() as rec:
        start = time.perf_counter()
        guide, result = local_fit.fit_local_trusted(
            model, x, args.family, init_from=encoder, progress=False, seed=0, **fit_args)
        seconds = time.perf_counter() - start
    row_steps = rec.schedule._optimizer.row_steps
    return {"name": name, "settings": settings, "seconds": seconds,
            "num_steps": result.num_steps, "mean_row_steps": float(row_steps.mean()),
            "mean_decays": float(rec.schedule.decays.double().mean()),
            "trace": rec.trace, "_guide": guide}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--points", type=int, default=24)
    parser.add_argument("--family", default="flow")
    parser.add_argument("--candidates", default=",".join(candidates()))
    parser.add_argument("--init", choices=("prior", "encoder"), default="prior")
    parser.add_argument("--encoder", default=None, help="{'encoder': state_dict} of MLPEncoder")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--eval-seed", type=int, default=123)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-ref-again", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/fit_local_schedule.json")
    args = parser.parse_args(argv)
    import warnings

    import torch

    import ppl_vae

    # The frozen model's modules warn once per trace; they are frozen on purpose.
    warnings.filterwarnings("ignore", message=".*was not registered in the param store")
    torch.set_num_threads(args.threads)
    model, x, encoder = load(args)
    table = candidates()
    names = [n for n in args.candidates.split(",") if n != "ref"]
    order = ["ref", *names] + ([] if args.no_ref_again else ["ref"])
    # Warm the process (imports, first traces), untimed.
    ppl_vae.local_fit.fit_local_trusted(model, x[:2], args.family, init_from=encoder,
                                        steps=5, lr=3e-2, num_particles=8, progress=False,
                                        seed=1)
    runs, elbos = [], {}
    for name in order:
        if name not in table:
            raise ValueError(f"unknown candidate {name!r}: one of {sorted(table)}")
        row = run(model, x, encoder, name, table[name], args)
        guide = row.pop("_guide")
        if name not in elbos:
            elbos[name] = ppl_vae.elbo(model, guide, x, args.num_samples,
                                       seed=args.eval_seed).double()
        runs.append(row)
        print(f"  {name:16} {row['seconds']:7.1f} s  steps {row['num_steps']:5d} (rows "
              f"{row['mean_row_steps']:7.1f})  "
              f"decays {row['mean_decays']:.2f}  ELBO {float(elbos[name].mean()):9.3f}",
              flush=True)
    ref_seconds = min(r["seconds"] for r in runs if r["name"] == "ref")
    print(f"\n{args.family} from the {args.init}, {args.points} points, {args.threads} thread;"
          f" ELBO at {args.num_samples} draws, seed {args.eval_seed}; ref {ref_seconds:.1f} s")
    print(f"  {'candidate':16} {'seconds':>8} {'ratio':>6} {'steps':>6} {'rows':>6} {'decays':>6} "
          f"{'ELBO':>9} {'paired diff':>17}")
    for row in runs:
        diff = elbos[row["name"]] - elbos["ref"]
        row["time_ratio"] = row["seconds"] / ref_seconds
        row["elbo"] = float(elbos[row["name"]].mean())
        row["elbo_difference"] = {"mean": float(diff.mean()),
                                  "se": float(diff.std() / len(diff) ** 0.5),
                                  "min": float(diff.min())}
        print(f"  {row['name']:16} {row['seconds']:8.1f} {row['time_ratio']:6.2f} "
              f"{row['num_steps']:6d} {row['mean_row_steps']:6.0f} {row['mean_decays']:6.2f} "
              f"{row['elbo']:9.3f} "
              f"{float(diff.mean()):+9.4f} ± {row['elbo_difference']['se']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"family": args.family, "init": args.init,
                               "points": args.points, "threads": args.threads,
                               "num_samples": args.num_samples, "eval_seed": args.eval_seed,
                               "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
