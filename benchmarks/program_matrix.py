"""Which model and guide styles each public entry point takes: works, refused, or fails.

Each cell calls one entry point on tiny data with one style of model and guide, written as
Pyro users write them, and records "works" (a finite result), "refused" (a ValueError from
the library's own checks) or "fails: <Exception>" (anything else, a defect).

    python -m benchmarks.program_matrix [--out FILE]

Run it on two checkouts to compare them (it uses only names that existed before the
boundary: ``plate=`` is not passed).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import constraints

import ppl_vae

RESULTS = Path(__file__).parent / "results" / "program_matrix.json"
D, N = 6, 32


class Tutorial(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(D, 4)
        self.decoder = nn.Linear(2, D)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, raw.exp()).to_event(1))


class ForwardModel(PyroModule):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, D)

    def forward(self, x):
        with pyro.plate("rows", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1))
            pyro.sample("obs", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)


class ForwardGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(D, 4)

    def forward(self, x):
        with pyro.plate("rows", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, raw.exp()).to_event(1))


def function_model(x):
    W = pyro.param("W", lambda: torch.randn(D, 2))
    sigma = pyro.param("sigma", lambda: torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("N", x.shape[0]):
        a = pyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.3))
        pyro.sample("obs", dist.Normal(a @ W.T, sigma * s[..., None]).to_event(1), obs=x)


def function_guide(x):
    A = pyro.param("A", lambda: torch.zeros(D, 2))
    scale = pyro.param("scale", lambda: torch.ones(2), constraint=constraints.positive)
    with pyro.plate("N", x.shape[0]):
        pyro.sample("a", dist.Normal(x @ A, scale).to_event(1))
        pyro.sample("s", dist.LogNormal(0.0, 0.3))


def styles() -> dict:
    """name -> (model, guide, data, latents of the data for bdmc)."""
    torch.manual_seed(0)
    binary = (torch.rand(N, D) < 0.3).float()
    real = torch.randn(N, D)
    tutorial = Tutorial()
    return {
        "tutorial VAE (bound methods, pyro.module)": (tutorial.model, tutorial.guide, binary),
        "forward(x) modules": (ForwardModel(), ForwardGuide(), real),
        "function + pyro.param, plate 'N', two sites": (function_model, function_guide, real),
        "AutoNormal guide": (function_model, AutoNormal(function_model), real),
        "AutoDiagonalNormal guide": (function_model, AutoDiagonalNormal(function_model), real),
        "AutoMultivariateNormal guide": (function_model, AutoMultivariateNormal(function_model),
                                         real),
    }


def entry_points(model, guide, x) -> dict:
    quiet = {"progress": False}
    return {
        "fit": lambda: ppl_vae.fit(model, guide, x, num_steps=3, **quiet).final_elbo,
        "log_weights": lambda: ppl_vae.log_weights(model, guide, x, 4, seed=0),
        "log_marginal": lambda: ppl_vae.log_marginal(model, guide, x, 4, seed=0),
        "elbo": lambda: ppl_vae.elbo(model, guide, x, 4, seed=0),
        "diagnostics": lambda: ppl_vae.diagnostics(model, guide, x, 4, seed=0).log_marginal,
        "ais": lambda: ppl_vae.ais(model, x, proposal=guide, num_steps=2, num_chains=2,
                                   seed=0, **quiet).log_marginal,
        "bdmc": lambda: _bdmc(model, x),
        "fit_local": lambda: ppl_vae.fit_local(model, x, "diag", init_from=guide, steps=3,
                                               seed=0, **quiet).loc,
        "gaps": lambda: ppl_vae.gaps(model, guide, x, local="diag", num_samples=4,
                                     local_steps=3, seed=0, **quiet).approximation_gap,
        "refine": lambda: _refine(model, guide, x),
        "sample_from_model": lambda: _sample(model, x),
    }


def _refine(model, guide, x):
    try:
        return ppl_vae.refine(model, guide, x, 2, num_samples=4, seed=0, progress=False,
                              local="diag").elbo
    except TypeError:  # before the boundary: no local= keyword
        return ppl_vae.refine(model, guide, x, 2, num_samples=4, seed=0, progress=False).elbo


def _bdmc(model, x):
    drawn, latents = _sample(model, x, with_latents=True)
    return ppl_vae.bdmc(model, drawn, latents, num_steps=2, num_chains=2, seed=0,
                        progress=False).lower


def _sample(model, x, with_latents=False):
    try:
        drawn, latents = ppl_vae.sample_from_model(model, len(x), like=x)
    except TypeError:  # before the boundary: no like= keyword
        drawn, latents = ppl_vae.sample_from_model(model, len(x))
    return (drawn, latents) if with_latents else drawn


def outcome(call) -> str:
    try:
        value = call()
    except ValueError as error:
        return "refused: " + str(error).split(":")[0][:60]
    except Exception as error:  # noqa: BLE001 - the point is to record what comes
        return f"fails: {type(error).__name__}"
    finite = (math.isfinite(value) if isinstance(value, float)
              else bool(torch.isfinite(torch.as_tensor(value)).all()))
    return "works" if finite else "fails: not finite"


def measure() -> dict:
    table = {}
    for name, (model, guide, x) in styles().items():
        row = {}
        for entry, call in entry_points(model, guide, x).items():
            pyro.clear_param_store()
            row[entry] = outcome(call)
        table[name] = row
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    table = measure()
    entries = list(next(iter(table.values())))
    print("| style | " + " | ".join(entries) + " |")
    print("| --- " * (len(entries) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(row[e].split(":")[0] for e in entries) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
