"""Cremer, Li & Duvenaud (2018), Table 2: inference gaps of VAEs trained with FFG and flow encoders.

Trains four VAEs with the library's public API (``ppl_vae.fit``): statically binarized
MNIST (Larochelle & Murray, ``binarized_mnist``) and Fashion-MNIST binarized at 0.5, each
with a fully factorized Gaussian encoder (``MLPEncoder``, "FFG") and with a flow encoder
(``FlowEncoder``). The architecture is the paper's: z = 50, encoder 784-200-200, decoder
50-200-200-784, ELU. Then, on a fixed random subset of training points and one of test
points, it measures per datapoint:

- L[q]: the encoder's ELBO;
- L[q*_FFG]: the ELBO of per-datapoint diagonal Gaussians (``fit_local(..., "diag")``,
  started from the encoder);
- L[q*_Flow]: the ELBO of per-datapoint flows (``fit_local(..., "flow")``);
- log p(x): AIS (``ppl_vae.ais``) started from the guide of highest mean ELBO, or the one
  ``--ais-proposal`` names; importance sampling from the local flows is stored beside it
  as a check;
- approximation gap log p(x) - L[q*] and amortization gap L[q*] - L[q], where q* is the
  best member of the encoder's own family;

all with standard errors (spread over datapoints plus Monte Carlo noise, through
``ppl_vae.GapReport``). BDMC (``ppl_vae.bdmc``) on points simulated from each trained
model (``ppl_vae.sample_from_model``) gives the sandwich upper - lower at the AIS budget.

    python -m benchmarks.cremer_table --data-root ../shared/data \\
        --epochs 50 --points 100 --ais-steps 500 --ais-chains 16 --bdmc-points 20

The paper's protocol is ``--paper`` (1000 points, AIS 100 chains x 10,000 steps; train
for as long as your budget allows, e.g. ``--epochs 3280`` as in the IWAE paper).

Resumable: training checkpoints with ``fit(checkpoint=..., resume=True)``; every finished
measurement is stored in ``<out>/results.json`` under a key naming its budget, local
guides are saved beside it, and a rerun skips what is done. Each entry records its
seconds.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path

import torch

import ppl_vae
from benchmarks.store import Store, opened
from ppl_vae import GapReport, pareto_khat
from ppl_vae.guides import FlowEncoder, MLPEncoder
from ppl_vae.json_output import dumps
from ppl_vae.models import VAE

# "digits" (the embedded 8x8 digits, statically binarized) is the seconds-long version
# that notebook 07 runs in quick mode.
DATASETS = {"mnist": "binarized_mnist", "fashion": "fashion_mnist", "digits": "digits"}
ENCODERS = ("ffg", "flow")
LATENT, HIDDEN, ACTIVATION = 50, (200, 200), "elu"

# Table 2 of Cremer et al. (2018), MNIST, VAE trained with the FFG encoder, 1000 training
# points, AIS 100 chains x 10,000 steps (as commonly cited); and the flow-trained
# decoder's L[q*_FFG].
PAPER_MNIST_FFG = {
    "log_px": -89.80, "elbo_flow_local": -90.80, "elbo_ffg_local": -91.23,
    "elbo_amortized": -92.57, "approximation_gap": 1.43, "amortization_gap": 1.34,
}
PAPER_MNIST_FLOW_FFG_LOCAL = -113.5

ROWS = (
    ("log p(x) (AIS)", "log_px"),
    ("L[q*_Flow]", "elbo_flow_local"),
    ("L[q*_FFG]", "elbo_ffg_local"),
    ("L[q]", "elbo_amortized"),
    ("approximation gap", "approximation_gap"),
    ("amortization gap", "amortization_gap"),
)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    out, store = opened(args, "results.json")
    if args.export:
        export(store.results, Path(args.export))
        return
    if args.print_only:
        print_tables(store.results, args)
        return
    for ds in args.datasets:
        for enc in args.encoders:
            measure_model(store, ds, enc, args, out)
    print_tables(store.results, args)


def measure_model(store: Store, ds: str, enc: str, args, out: Path) -> None:
    """Train one model (resumable) and store every measurement of it not yet stored."""
    tag = model_tag(ds, enc, args)
    model, encoder = build(enc, ds, args)
    store.run(f"{tag}/train", partial(train, model, encoder, ds, tag, args, out))
    if args.train_only:
        return
    load_trained(model, encoder, _weights_path(out, tag))
    for p in (*model.parameters(), *encoder.parameters()):
        p.requires_grad_(False)
    x, n_train = eval_data(ds, args)
    etag = f"{tag}/n{args.points}"
    for family in ("diag", "flow"):
        store.run(f"{etag}/local/{family}",
                  partial(local_fit, model, encoder, x, family, etag, args, out))
    store.run(f"{etag}/local", partial(local_elbos, model, encoder, x, etag, args, out))
    atag = f"{etag}/{ais_tag(args)}"
    proposal = ais_proposal(store.results[f"{etag}/local"], args)
    guide = encoder if proposal == "amortized" else _local_guide(out, etag, proposal)
    # AIS in chunks of rows, each stored as it finishes: a stopped run loses one chunk.
    for start in range(0, len(x), args.ais_chunk):
        rows = slice(start, min(start + args.ais_chunk, len(x)))
        store.run(f"{atag}/rows{rows.start}-{rows.stop}",
                  partial(ais_log_px, model, guide, x[rows], args))
    store.run(atag, partial(joined_chunks, store.results, atag, len(x), proposal, args))
    for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        store.run(f"{atag}/{split}", partial(table_entry, store.results[f"{etag}/local"],
                                             store.results[atag], rows, enc, args))
    btag = f"{tag}/bdmc{args.bdmc_points}/ais{args.bdmc_steps}x{args.ais_chains}"
    store.run(btag, partial(bdmc, model, encoder, args))


def ais_tag(args) -> str:
    """The AIS budget in a key; the proposal is named unless it is the default "best"."""
    proposal = "" if args.ais_proposal == "best" else f"-{args.ais_proposal}"
    return f"ais{args.ais_steps}x{args.ais_chains}{proposal}"


def ais_proposal(local: dict, args) -> str:
    """"amortized", "diag" or "flow": the guide AIS starts from."""
    return local["best_local"] if args.ais_proposal == "best" else args.ais_proposal


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS),
                        default=["mnist", "fashion"])
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-schedule", default="constant",
                        choices=["constant", "cosine", "exponential"])
    parser.add_argument("--num-flows", type=int, default=2,
                        help="coupling layers of the flow encoder")
    parser.add_argument("--latent-dim", type=int, default=LATENT)
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN),
                        help="hidden widths of encoder and decoder")
    parser.add_argument("--points", type=int, default=100,
                        help="training points and as many test points")
    parser.add_argument("--num-samples", type=int, default=1000,
                        help="K, samples per datapoint of each ELBO")
    parser.add_argument("--local-steps", type=int, default=3000)
    parser.add_argument("--ais-steps", type=int, default=500)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--ais-proposal", default="best",
                        choices=["best", "amortized", "diag", "flow"],
                        help="the guide AIS starts from; best: the one of highest mean ELBO")
    parser.add_argument("--ais-chunk", type=int, default=250,
                        help="rows per stored AIS result (the unit a rerun resumes from)")
    parser.add_argument("--bdmc-points", type=int, default=20)
    parser.add_argument("--bdmc-steps", type=int, default=None,
                        help="AIS steps of BDMC (default: --ais-steps)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's protocol: 1000 points, AIS 100 chains x 10,000 steps")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or resume training) the models; measure nothing")
    parser.add_argument("--export", metavar="JSON",
                        help="write a compact copy of the store (the tables, their "
                             "per-datapoint gaps, BDMC and timings; no AIS chunks or local "
                             "ELBO lists) for notebook 07; measure nothing")
    parser.add_argument("--print-only", action="store_true",
                        help="print the tables of what the store holds; measure nothing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/cremer")
    return _Defaults(parser)


class _Defaults:
    """The parser, with --bdmc-steps defaulting to --ais-steps after parsing."""

    def __init__(self, parser):
        self.parser = parser

    def parse_args(self, argv=None):
        args = self.parser.parse_args(argv)
        if args.paper:
            args.points, args.ais_steps, args.ais_chains = 1000, 10000, 100
        if args.bdmc_steps is None:
            args.bdmc_steps = args.ais_steps
        return args


# ------------------------------------------------------------------ models and data


def model_tag(ds: str, enc: str, args) -> str:
    # The first runs (Adam 1e-3, constant) keep their short tags.
    recipe = "" if (args.lr, args.lr_schedule) == (1e-3, "constant") else \
        f"-lr{args.lr:g}-{args.lr_schedule}"
    return f"{ds}/{enc}/e{args.epochs}{recipe}"


def build(enc: str, ds: str = "mnist", args=None):
    """The paper's VAE and encoder (z = 50, 200-200, ELU), or --latent-dim/--hidden."""
    data_dim = 64 if ds == "digits" else 784
    latent = args.latent_dim if args is not None else LATENT
    hidden = tuple(args.hidden) if args is not None else HIDDEN
    num_flows = args.num_flows if args is not None else 2
    # fit(seed=...) seeds the training draws; the initial weights are drawn here.
    torch.manual_seed(args.seed if args is not None else 0)
    model = VAE(data_dim, latent, hidden=hidden, activation=ACTIVATION)
    if enc == "ffg":
        encoder = MLPEncoder(data_dim, latent, hidden=hidden, activation=ACTIVATION)
    else:
        encoder = FlowEncoder(data_dim, latent, hidden=hidden, activation=ACTIVATION,
                              num_flows=num_flows)
    return model, encoder


def load(ds: str, split: str, args, limit=None, seed=0):
    if ds == "digits":
        # Binarized once with seed 0 (as in training), then a subset chosen by `seed`.
        x = ppl_vae.load_dataset("digits", split, binarize="static")
        if limit is not None and limit < len(x):
            gen = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(len(x), generator=gen)[:limit].sort().values]
        return x
    # The paper thresholds Fashion-MNIST's intensities at 0.5.
    binarize = "threshold" if ds == "fashion" else None
    return ppl_vae.load_dataset(DATASETS[ds], split, root=args.data_root, limit=limit,
                                seed=seed, binarize=binarize)


def eval_data(ds: str, args):
    """``points`` training rows then ``points`` test rows (fixed random subsets)."""
    train = load(ds, "train", args, limit=args.points, seed=args.seed)
    test = load(ds, "test", args, limit=args.points, seed=args.seed)
    return torch.cat([train, test]), len(train)


def train(model, encoder, ds, tag, args, out) -> dict:
    x = load(ds, "train", args)
    path = out / f"{tag.replace('/', '_')}.ckpt"
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    start = time.perf_counter()
    result = ppl_vae.fit(model, encoder, x, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, lr_schedule=args.lr_schedule, seed=args.seed,
                         progress=False, checkpoint=path,
                         checkpoint_every=10 * steps_per_epoch, resume=path.exists())
    seconds = time.perf_counter() - start
    torch.save({"model": model.state_dict(), "encoder": encoder.state_dict()},
               _weights_path(out, tag))
    epoch_elbo = result.history.reshape(args.epochs, -1).mean(1)
    return {"epochs": args.epochs, "steps": result.num_steps,
            "final_train_elbo": result.final_elbo, "epoch_elbo": epoch_elbo.tolist(),
            "seconds_this_call": seconds,
            "seconds_per_epoch": float(result.step_seconds.sum()) / args.epochs}


def _weights_path(out: Path, tag: str) -> Path:
    return out / (tag.replace("/", "_") + ".pt")


def load_trained(model, encoder, path) -> None:
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    encoder.load_state_dict(state["encoder"])


# ------------------------------------------------------------------ the measurements


def local_fit(model, encoder, x, family, etag, args, out) -> dict:
    """One local family fitted to every row, started from the encoder, saved to a file
    (the store records the seconds)."""
    guide = ppl_vae.fit_local(model, x, family, init_from=encoder, steps=args.local_steps,
                              progress=False, seed=args.seed)
    torch.save(guide, _local_guide_path(out, etag, family))
    return {"family": family}


def _local_guide_path(out: Path, etag: str, family: str) -> Path:
    return out / (etag.replace("/", "_") + f"_{family}.pt")


def _local_guide(out: Path, etag: str, family: str):
    return torch.load(_local_guide_path(out, etag, family), weights_only=False)


def local_elbos(model, encoder, x, etag, args, out) -> dict:
    """The paired log weights of the encoder and both local guides, per datapoint."""
    guides = {"amortized": encoder, **{f: _local_guide(out, etag, f) for f in ("diag", "flow")}}
    lw = {name: ppl_vae.log_weights(model, guide, x, args.num_samples, seed=args.seed + 1)
          for name, guide in guides.items()}
    per = {}
    for name, w in lw.items():
        per[f"elbo_{name}"] = w.mean(0).tolist()
        per[f"elbo_{name}_se"] = (w.std(0) / math.sqrt(len(w))).tolist()
        per[f"khat_{name}"] = pareto_khat(w).tolist()
        # Importance sampling from the same draws: a check on AIS that shares no code.
        per[f"is_{name}"] = (w.logsumexp(0) - math.log(len(w))).tolist()
    # Paired (common random numbers) standard errors of the differences.
    for a, b in (("diag", "amortized"), ("flow", "amortized")):
        d = lw[a] - lw[b]
        per[f"diff_{a}_{b}_se"] = (d.std(0) / math.sqrt(len(d))).tolist()
    # "best": the guide of highest mean ELBO (the encoder itself can win: a local flow
    # cannot copy a flow encoder's conditional layers, see fit_local).
    best = max(lw, key=lambda name: float(lw[name].mean()))
    return {"per_datapoint": per, "best_local": best, "num_samples": args.num_samples,
            "means": {k: sum(v) / len(v) for k, v in per.items() if k.startswith("elbo_")
                      and not k.endswith("_se")}}


def ais_log_px(model, guide, x, args) -> dict:
    result = ppl_vae.ais(model, x, proposal=guide, num_steps=args.ais_steps,
                         num_chains=args.ais_chains, seed=args.seed, progress=False)
    return {"log_px": result.log_marginal.tolist(),
            "log_px_se": result.log_marginal_se.tolist(), "ess": result.ess.tolist(),
            "acceptance": float(result.acceptance.mean())}


def joined_chunks(results: dict, atag: str, n: int, proposal: str, args) -> dict:
    """The chunks' per-datapoint values in row order, with the AIS seconds they took."""
    chunks = [results[f"{atag}/rows{a}-{min(a + args.ais_chunk, n)}"]
              for a in range(0, n, args.ais_chunk)]
    joined = {k: [v for c in chunks for v in c[k]] for k in ("log_px", "log_px_se", "ess")}
    acceptance = sum(c["acceptance"] * len(c["log_px"]) for c in chunks) / n
    return {**joined, "acceptance": acceptance,
            "proposal": proposal if proposal == "amortized" else f"local {proposal}",
            "ais_seconds": sum(c["seconds"] for c in chunks)}


def table_entry(local: dict, ais_result: dict, rows: slice, enc: str, args) -> dict:
    """One column of the table: means with standard errors, via GapReport."""
    per = {k: torch.tensor(v, dtype=torch.float64)[rows]
           for k, v in local["per_datapoint"].items()}
    log_px = torch.tensor(ais_result["log_px"], dtype=torch.float64)[rows]
    log_px_se = torch.tensor(ais_result["log_px_se"], dtype=torch.float64)[rows].nan_to_num()
    family = "diag" if enc == "ffg" else "flow"
    star, star_se = per[f"elbo_{family}"], per[f"elbo_{family}_se"]
    q, q_se = per["elbo_amortized"], per["elbo_amortized_se"]
    report = GapReport.from_per_datapoint(
        {
            "log_px": log_px, "log_px_se": log_px_se,
            "elbo_local": star, "elbo_local_se": star_se,
            "elbo_amortized": q, "elbo_amortized_se": q_se,
            # AIS is independent of the ELBOs' draws: its error adds in quadrature.
            "approximation_gap": log_px - star,
            "approximation_gap_se": torch.hypot(log_px_se, star_se),
            "amortization_gap": star - q,
            "amortization_gap_se": per[f"diff_{family}_amortized_se"],
            "inference_gap": log_px - q, "inference_gap_se": torch.hypot(log_px_se, q_se),
            "khat": per[f"khat_{family}"],
        },
        log_px_method="ais", local_family=family, num_samples=local["num_samples"],
        local_steps=args.local_steps,
        log_px_settings={"num_steps": args.ais_steps, "num_chains": args.ais_chains},
    )
    entry = report.to_dict(per_datapoint=False)
    # The other local family's ELBO, for the table's L[q*_Flow] and L[q*_FFG] rows.
    for name, key in (("flow", "elbo_flow_local"), ("diag", "elbo_ffg_local")):
        values, se = per[f"elbo_{name}"], per[f"elbo_{name}_se"]
        entry[key] = float(values.mean())
        entry[key + "_se"] = math.sqrt(float(values.var()) / len(values)
                                       + float(se.square().sum()) / len(values) ** 2)
    # log p(x) by importance sampling from the local flows (a lower bound in expectation),
    # beside AIS: where the two disagree by more than their errors, one of them is off.
    if "is_flow" in per:
        entry["log_px_is_flow"] = float(per["is_flow"].mean())
        entry["log_px_is_flow_se"] = math.sqrt(float(per["is_flow"].var()) / len(star))
    entry["per_datapoint"] = {
        "approximation_gap": (log_px - star).tolist(),
        "amortization_gap": (star - q).tolist(),
        "log_px": log_px.tolist(),
    }
    return entry


def bdmc(model, encoder, args) -> dict:
    xs, latents = ppl_vae.sample_from_model(model, args.bdmc_points, seed=args.seed)
    result = ppl_vae.bdmc(model, xs, latents, proposal=encoder, num_steps=args.bdmc_steps,
                          num_chains=args.ais_chains, seed=args.seed, progress=False)
    return {**result.summary(), "proposal": "encoder"}


# ------------------------------------------------------------------ printing


def export(results: dict, path: Path) -> None:
    """What notebook 07 reads, small enough to commit: lists other than the table's
    per-datapoint gaps are dropped, and floats rounded to 1e-4 nats."""
    compact = {}
    for key, entry in results.items():
        if "/rows" in key:
            continue
        keep = {k: v for k, v in entry.items()
                if not isinstance(v, list) or k == "epoch_elbo"}
        if "per_datapoint" in keep and not key.endswith(("/train", "/test")):
            del keep["per_datapoint"]
        compact[key] = _rounded(keep)
    path.write_text(dumps(compact, indent=1))
    print(f"{len(compact)} entries written to {path}")


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _fmt(entry: dict | None, key: str) -> str:
    if entry is None:
        return "—"
    return f"{entry[key]:.2f} ± {entry[key + '_se']:.2f}"


def print_tables(results: dict, args) -> None:
    for ds in args.datasets:
        cols = []
        for enc in args.encoders:
            base = f"{model_tag(ds, enc, args)}/n{args.points}/{ais_tag(args)}"
            for split in ("train", "test"):
                cols.append((f"{enc} {split}", results.get(f"{base}/{split}")))
        if not any(entry for _, entry in cols):
            continue
        print(f"\n{ds}: {args.points} points per split, {args.epochs} epochs, "
              f"AIS {args.ais_chains} chains x {args.ais_steps} steps")
        paper = ds == "mnist"
        header = "| quantity | " + " | ".join(name for name, _ in cols)
        header += " | paper FFG (train) |" if paper else " |"
        print(header)
        print("| --- |" + " ---: |" * (len(cols) + paper))
        for label, key in ROWS:
            line = f"| {label} | " + " | ".join(_fmt(entry, key) for _, entry in cols)
            line += f" | {PAPER_MNIST_FFG[key]:.2f} |" if paper else " |"
            print(line)
        checks = [f"{name} {entry['log_px_is_flow']:.2f}" for name, entry in cols
                  if entry and "log_px_is_flow" in entry]
        if checks:
            print(f"log p(x) by IS from the local flows, K={args.num_samples}: "
                  + ", ".join(checks))
        if paper:
            print(f"(paper: the flow-trained decoder's L[q*_FFG] is about "
                  f"{PAPER_MNIST_FLOW_FFG_LOCAL})")
        for enc in args.encoders:
            b = results.get(f"{model_tag(ds, enc, args)}/bdmc{args.bdmc_points}/"
                            f"ais{args.bdmc_steps}x{args.ais_chains}")
            if b:
                print(f"BDMC {ds} {enc}: lower {b['lower']:.2f}, upper {b['upper']:.2f}, "
                      f"sandwich {b['gap']:.3f} ± {b['gap_se']:.3f} "
                      f"({b['num_data']} simulated points, {b['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
