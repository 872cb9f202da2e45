"""Evaluation throughput with 1 and 2 processes at equal total threads.

One process with 2 threads against 2 gloo processes with 1 thread each (torch
.multiprocessing on this machine), on the MNIST-sized VAE 784-200-200-50 with random
weights and random binary data (the speed does not depend on the values):

- ``log_marginal`` with K importance samples (points/s);
- ``ais`` with T steps x C chains (points/s);
- ``fit_local`` (diagonal local guides, ``--local-steps`` steps; points/s);
- ``fit`` with batch 100 (steps/s; DDP over the global minibatch with 2 processes).

Each measurement is the best of ``--repeats``; the 2-process figure is the slower
rank's wall-clock time, including the all-gather. Results must be equal in both
settings (checked). Prints a table and writes ``--out``/scaling.json.

    python -m benchmarks.scaling [--points 200 --samples 1000 --ais-steps 20]
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ppl_vae
from ppl_vae.guides import MLPEncoder
from ppl_vae.json_output import dumps
from ppl_vae.models import VAE


def workload(args):
    torch.manual_seed(0)
    model, guide = VAE(784, 50), MLPEncoder(784, 50)
    x = (torch.rand(args.points, 784) < 0.3).float()
    return model, guide, x


def measure(args) -> dict:
    model, guide, x = workload(args)
    out = {}
    for name, run in {
        "log_marginal": lambda: ppl_vae.log_marginal(model, guide, x, args.samples, seed=0),
        "ais": lambda: ppl_vae.ais(model, x, proposal=guide, num_steps=args.ais_steps,
                                   num_chains=args.ais_chains, seed=0,
                                   progress=False).log_marginal,
        # Each rank fits its own rows of the local guides.
        "fit_local": lambda: ppl_vae.fit_local(model, x, "diag", steps=args.local_steps,
                                               tol=0.0, seed=0, progress=False).loc,
        # DDP over one global minibatch of 100: "points" below are optimizer steps.
        "fit": lambda: torch.tensor(ppl_vae.fit(model, guide, x, num_steps=args.fit_steps,
                                                batch_size=100, seed=0,
                                                progress=False).history),
    }.items():
        best, value = float("inf"), None
        for _ in range(args.repeats):
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            value = run()
            best = min(best, time.perf_counter() - start)
        count = args.fit_steps if name == "fit" else len(x)
        out[name] = {"seconds": best, "per_second": count / best, "mean": float(value.mean())}
    return out


def _worker(rank, world, port, args, path):
    torch.set_num_threads(args.threads // world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        result = measure(args)
        Path(path, f"rank{rank}.json").write_text(dumps(result))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--ais-steps", type=int, default=20)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--fit-steps", type=int, default=100)
    parser.add_argument("--local-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/scaling")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    one = measure(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, args, str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    table = {}
    for name in one:
        two_seconds = max(r[name]["seconds"] for r in ranks)
        if name != "fit":  # evaluation is equal to one process; training follows its own path
            assert abs(ranks[0][name]["mean"] - one[name]["mean"]) < 1e-4, name
        table[name] = {"one_process_s": one[name]["seconds"], "two_processes_s": two_seconds,
                       "speedup": one[name]["seconds"] / two_seconds,
                       "per_second_1": one[name]["per_second"],
                       "per_second_2": one[name]["per_second"] * one[name]["seconds"]
                       / two_seconds}
    (out / "scaling.json").write_text(dumps({"args": vars(args), **table}, indent=2))
    print(f"| {args.points} points, {args.threads} threads in all | 1 process (/s) | "
          "2 processes (/s) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in table.items():
        unit = "steps" if name == "fit" else "points"
        print(f"| {name} ({unit}) | {r['per_second_1']:.1f} | {r['per_second_2']:.1f} | "
              f"{r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
