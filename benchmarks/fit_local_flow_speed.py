"""Seconds per point of fit_local("flow") (and "diag", "full"): this tree against a baseline.

    python -m benchmarks.fit_local_flow_speed --checkpoint /tmp/vae.pt --data-root ../shared/data \
        [--baseline /tmp/wt-base] [--points 48] [--families flow,full,diag] [--repeats 2]

``--checkpoint`` holds ``{"model": state_dict}`` of a trained ``VAE(784, --latent-dim,
hidden=--hidden)`` (``benchmarks.local_fit_rows`` writes one; so does a plain
``torch.save``). Every fit is the default ``fit_local(model, x, family, seed=0)`` on the
first ``--points`` binarized MNIST test points, started at the prior, with each tree's
default schedule (up to 3000 steps under the plateau rule before issue 21; 1000 steps of
the sticking gradient on a cosine for the flow after it).

Each fit runs in a fresh worker process, on this tree or on ``--baseline`` (another
checkout of the repository, for example ``git worktree add /tmp/wt-base main``), in
alternating order, ``--repeats`` times; the best time is kept. The fitted guides are
then scored here, with this tree's ``ppl_vae.elbo`` at ``--num-samples`` draws per point
under one seed: the same draws for both guides of a family, so that the paired
difference per point sees the guides, not the draws. A seeded fit gives the same guide
in every repeat; the benchmark checks it. Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def use_tree(tree: Path) -> None:
    """Import ``ppl_vae`` (with its ``guides`` and ``models``) from the checkout ``tree``.

    An editable install maps ``ppl_vae.guides`` and ``ppl_vae.models`` to the top-level
    folders of its own checkout; a finder placed first redirects them.
    """
    folders = {"ppl_vae": tree / "ppl_vae", "ppl_vae.guides": tree / "guides",
               "ppl_vae.models": tree / "models"}

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname in folders:
                return importlib.util.spec_from_file_location(
                    fullname, folders[fullname] / "__init__.py",
                    submodule_search_locations=[str(folders[fullname])])
            parent = fullname.rpartition(".")[0]
            if parent in folders:
                return importlib.machinery.PathFinder.find_spec(fullname, [str(folders[parent])])
            return None

    sys.meta_path.insert(0, Finder())


def load_model(args):
    import torch

    from ppl_vae.models import VAE

    model = VAE(784, args.latent_dim, hidden=tuple(args.hidden))
    model.load_state_dict(torch.load(args.checkpoint)["model"])
    return model


def test_points(args):
    import ppl_vae

    return ppl_vae.load_dataset("binarized_mnist", "test", root=args.data_root,
                                limit=args.points)


def worker(args) -> None:
    """One timed fit on ``args.tree``; its guide's state goes to ``args.guide_out``."""
    use_tree(Path(args.tree))
    import inspect
    import time

    import torch

    import ppl_vae
    import ppl_vae.local_fit as local_fit

    torch.set_num_threads(args.threads)
    model, x = load_model(args), test_points(args)
    # Warm the process (imports, first trace of a shape) on another fit, untimed.
    local_fit.fit_local_trusted(model, x[:2], args.family, init_from=None, steps=5,
                                lr=3e-2, num_particles=8, progress=False, seed=1)
    # fit_local's own default steps in that tree (3000 before issue 21; None, the
    # family's, after it), so that each side runs its default fit.
    steps = inspect.signature(local_fit.fit_local).parameters["steps"].default
    start = time.perf_counter()
    guide, result = local_fit.fit_local_trusted(
        model, x, args.family, init_from=None, steps=steps, lr=3e-2, num_particles=8,
        progress=False, seed=0)
    seconds = time.perf_counter() - start
    torch.save(guide.state_dict(), args.guide_out)
    print(json.dumps({"seconds": seconds, "steps": result.num_steps,
                      "tree": str(Path(ppl_vae.__file__).parents[1])}))


def run_worker(args, tree: Path, family: str, guide_out: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.fit_local_flow_speed", "--worker",
               "--tree", str(tree), "--family", family, "--guide-out", str(guide_out),
               "--checkpoint", args.checkpoint, "--points", str(args.points),
               "--latent-dim", str(args.latent_dim), "--threads", str(args.threads),
               "--hidden", *map(str, args.hidden)]
    if args.data_root:
        command += ["--data-root", args.data_root]
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker on {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(args, family: str, state_path: Path):
    """ELBO per point (N,) of a saved guide, with this tree's estimator and one seed."""
    import torch

    import ppl_vae
    from ppl_vae.guides.latent_space import LatentSpace
    from ppl_vae.guides.local import LOCAL_GUIDES

    model, x = load_model(args), test_points(args)
    guide = LOCAL_GUIDES[family](len(x), LatentSpace.of(model, x))
    guide.load_state_dict(torch.load(state_path))
    return ppl_vae.elbo(model, guide, x, args.num_samples, seed=args.eval_seed)


def compare(args, family: str, folder: Path) -> dict:
    """Alternating timed fits of both trees, then their guides' ELBOs, paired per point."""
    import torch

    trees = {"after": HERE, "before": Path(args.baseline)}
    runs = {name: [] for name in trees}
    for repeat in range(args.repeats):
        order = list(trees) if repeat % 2 == 0 else list(trees)[::-1]
        for name in order:
            out = folder / f"{family}-{name}-{repeat}.pt"
            runs[name].append(run_worker(args, trees[name], family, out))
            print(f"  {family} {name} repeat {repeat}: {runs[name][-1]['seconds']:.1f} s, "
                  f"{runs[name][-1]['steps']} steps", flush=True)
    row = {"family": family}
    for name in trees:
        states = [torch.load(folder / f"{family}-{name}-{r}.pt") for r in range(args.repeats)]
        same = all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
        elbo = score(args, family, folder / f"{family}-{name}-0.pt")
        seconds = min(r["seconds"] for r in runs[name])
        row[name] = {"seconds": seconds, "seconds_per_point": seconds / args.points,
                     "all_seconds": [r["seconds"] for r in runs[name]],
                     "steps": runs[name][0]["steps"], "repeats_identical": same,
                     "elbo": float(elbo.mean()),
                     "elbo_se": float(elbo.std() / len(elbo) ** 0.5)}
        row[name]["_elbo"] = elbo
    diff = row["after"].pop("_elbo") - row["before"].pop("_elbo")
    row["speedup"] = row["before"]["seconds"] / row["after"]["seconds"]
    row["elbo_difference"] = {"mean": float(diff.mean()),
                              "se": float(diff.std() / len(diff) ** 0.5),
                              "min": float(diff.min()), "max": float(diff.max())}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--baseline", default=None, help="checkout of the code to compare with")
    parser.add_argument("--points", type=int, default=48)
    parser.add_argument("--families", default="flow,full,diag")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--eval-seed", type=int, default=1)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/fit_local_flow_speed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--guide-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.baseline is None:
        args.baseline = str(HERE)  # this tree against itself: the noise of the timing
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families.split(","):
            rows.append(compare(args, family, Path(folder)))
    print(f"fit_local on {args.points} binarized MNIST test points, {args.threads} thread(s),"
          f" best of {args.repeats}; ELBO with {args.num_samples} draws per point")
    print(f"  {'family':6} {'s/pt before':>11} {'s/pt after':>10} {'speedup':>7} "
          f"{'steps b/a':>11} {'ELBO before':>12} {'ELBO after':>11} {'after-before':>16}")
    for row in rows:
        b, a, d = row["before"], row["after"], row["elbo_difference"]
        print(f"  {row['family']:6} {b['seconds_per_point']:11.2f} "
              f"{a['seconds_per_point']:10.2f} {row['speedup']:7.2f} "
              f"{b['steps']:5d}/{a['steps']:<5d} {b['elbo']:12.3f} {a['elbo']:11.3f} "
              f"{d['mean']:+9.4f} ± {d['se']:.4f}")
    result = {"checkpoint": args.checkpoint, "points": args.points, "threads": args.threads,
              "repeats": args.repeats, "num_samples": args.num_samples,
              "baseline": args.baseline, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
