"""What the boundary costs: a VAE written as in Pyro's tutorial against the same networks
in the library's own convention, through ``fit`` steps and ``log_marginal``.

The tutorial style: bound methods ``model(x)`` / ``guide(x)``, ``pyro.module`` on plain
``nn.Module`` networks (parameters in Pyro's global param store), ``pyro.plate("data",
x.shape[0])``. The convention: PyroModules with ``forward(x, idx, num_data)`` and the
``"data"`` plate. Same sizes (784-200-200-50, Bernoulli), same initial weights.

    python -m benchmarks.boundary_cost [--steps 200] [--repeats 5] [--out FILE]

Runs alternate (tutorial, convention, ...); each figure is the best of the repeats, and
the ratio is tutorial / convention (1.0 = free).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

import ppl_vae
from ppl_vae.models.blocks import MLP, data_plate, network

D, K, N, BATCH, HIDDEN = 784, 50, 5000, 100, (200, 200)
EVAL_POINTS, EVAL_K = 100, 1000
RESULTS = Path(__file__).parent / "results" / "boundary_cost.json"


class TutorialVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = MLP(D, K, K, hidden=HIDDEN)
        self.decoder = MLP(K, D, hidden=HIDDEN)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([x.shape[0], K])
                            .to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


class ConventionModel(PyroModule):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([x.shape[0], K])
                            .to_event(1))
            logits = network(self, "decoder")(z)
            pyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class ConventionGuide(PyroModule):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            loc, raw = network(self, "encoder")(x)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


def routes(start: TutorialVAE):
    """(tutorial model, guide), (convention model, guide), each with fresh weight copies."""
    tutorial = copy.deepcopy(start)
    twin = copy.deepcopy(start)
    return ((tutorial.model, tutorial.guide),
            (ConventionModel(twin.decoder), ConventionGuide(twin.encoder)))


def fit_seconds(pair, x, steps: int) -> float:
    pyro.clear_param_store()
    result = ppl_vae.fit(*pair, x, num_steps=steps, batch_size=BATCH, lr=1e-3, seed=0,
                         progress=False)
    return float(np.median(result.step_seconds[10:]))


def log_marginal_seconds(pair, x) -> float:
    pyro.clear_param_store()
    start = time.perf_counter()
    ppl_vae.log_marginal(*pair, x, num_samples=EVAL_K, seed=0)
    return time.perf_counter() - start


def measure(steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = (torch.rand(N, D) < 0.15).float()
    start = TutorialVAE()
    timings = {"fit_step": ([], []), "log_marginal": ([], [])}
    for _ in range(repeats):
        tutorial, convention = routes(start)
        for name, run in (("fit_step", lambda p: fit_seconds(p, x, steps)),
                          ("log_marginal", lambda p: log_marginal_seconds(p, x[:EVAL_POINTS]))):
            timings[name][0].append(run(tutorial))
            timings[name][1].append(run(convention))
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "repeats": repeats, "steps": steps}
    for name, (ours, theirs) in timings.items():
        out[name] = {"tutorial_s": min(ours), "convention_s": min(theirs),
                     "ratio": min(ours) / min(theirs)}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args.steps, args.repeats)
    print(f"| work | tutorial style | convention | ratio |  ({result['threads']} threads, "
          f"best of {args.repeats})")
    print("| --- | ---: | ---: | ---: |")
    for name, unit, scale in (("fit_step", "ms/step", 1e3), ("log_marginal", "s", 1.0)):
        r = result[name]
        print(f"| {name} | {scale * r['tutorial_s']:.3f} {unit} | "
              f"{scale * r['convention_s']:.3f} {unit} | {r['ratio']:.3f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
