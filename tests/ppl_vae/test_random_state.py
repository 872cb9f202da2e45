"""A seeded call is a function of its seed: it leaves the caller's generators (torch's,
Python's, numpy's; CUDA's in tests/ppl_vae/test_cuda.py) where they were, so what a
script draws next does not depend on which seeded estimates it ran in between."""

import random

import numpy as np
import pyro
import pytest
import torch

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA

torch.manual_seed(0)
MODEL, GUIDE = PPCA(5, 2), LinearEncoder(5, 2)
X = torch.randn(40, 5)
SIMULATED, LATENTS = ppl_vae.sample_from_model(MODEL, 20, seed=1)
SHORT = dict(num_steps=3, num_chains=2, seed=0, progress=False)

CALLS = {
    "log_weights": lambda: ppl_vae.log_weights(MODEL, GUIDE, X, 10, seed=0),
    "log_marginal": lambda: ppl_vae.log_marginal(MODEL, GUIDE, X, 10, seed=0),
    "elbo": lambda: ppl_vae.elbo(MODEL, GUIDE, X, 10, seed=0),
    "diagnostics": lambda: ppl_vae.diagnostics(MODEL, GUIDE, X, 10, seed=0),
    "ais from the guide": lambda: ppl_vae.ais(MODEL, X, proposal=GUIDE, **SHORT),
    "ais from the prior": lambda: ppl_vae.ais(MODEL, X, **SHORT),
    "bdmc": lambda: ppl_vae.bdmc(MODEL, SIMULATED, LATENTS, **SHORT),
    "fit_local": lambda: ppl_vae.fit_local(MODEL, X, "diag", steps=5, seed=0, progress=False),
    "gaps": lambda: ppl_vae.gaps(MODEL, GUIDE, X, num_samples=10, local_steps=5, seed=0,
                                 log_px="is", progress=False),
    "gaps with ais": lambda: ppl_vae.gaps(MODEL, GUIDE, X[:16], num_samples=10,
                                          local_steps=5, log_px="ais", ais_steps=3,
                                          ais_chains=2, seed=0, progress=False),
    "elbo_surgery": lambda: ppl_vae.elbo_surgery(MODEL, GUIDE, X, num_samples=4, seed=0),
    "sample_from_model": lambda: ppl_vae.sample_from_model(MODEL, 10, seed=0),
}


def draws():
    return torch.rand(3), random.random(), np.random.rand()


@pytest.mark.parametrize("name", list(CALLS))
def test_a_seeded_call_leaves_the_caller_s_generators_alone(name):
    pyro.set_rng_seed(11)
    expected = draws()
    pyro.set_rng_seed(11)
    CALLS[name]()
    got = draws()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_an_unseeded_call_draws_from_the_caller_s_generator():
    # The converse, so that the test above can fail: without a seed, the call's seed is
    # drawn from torch's generator, which moves on.
    pyro.set_rng_seed(11)
    expected = draws()
    pyro.set_rng_seed(11)
    ppl_vae.ais(MODEL, X, num_steps=3, num_chains=2, progress=False)
    assert not torch.equal(draws()[0], expected[0])
