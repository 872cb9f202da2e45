"""Property-based tests of the public API: any input gives a finite answer or the
library's own refusal.

Random shapes, dtypes, sizes (0 and 1 rows included), NaN/inf placements and argument
values go to every entry point. Each call must either return a result in which every
number that the API promises is finite, or raise ValueError / TypeError from the
library's own checks (the raising frame inside ppl_vae, its models or its guides), never
an exception from inside torch, Pyro or ArviZ, and never NaN.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppl_vae
from ppl_vae.data import DatasetNotFoundError
from ppl_vae.guides import LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE

pytestmark = pytest.mark.filterwarnings("ignore")

SETTINGS = settings(derandomize=True, max_examples=25, deadline=None,
                    suppress_health_check=list(HealthCheck))
# Where the library's own code lives: its refusals are raised from frames in here.
LIBRARY = tuple(str(Path(module.__file__).parent) for module in
                (ppl_vae, ppl_vae.models, ppl_vae.guides))
D = 3


def refused_by_library(error: BaseException) -> bool:
    """True for a ValueError/TypeError (or the library's DatasetNotFoundError) whose
    raising frame is the library's own."""
    if not isinstance(error, (ValueError, TypeError, DatasetNotFoundError)):
        return False
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return frame.filename.startswith(LIBRARY)


def outcome(call):
    """The call's result, or None when the library refused it; anything else fails."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - which exception is the property
        if refused_by_library(error):
            return None
        raise AssertionError(f"not the library's own refusal: {error!r}") from error


def all_finite(*values) -> bool:
    return all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)


@st.composite
def datasets(draw, data_dim: int = D):
    """Arrays or tensors of 0-3 rows, mostly ``data_dim`` columns, of any dtype, maybe
    with NaN or inf somewhere."""
    rows = draw(mostly([1, 2, 3], [0]))
    cols = draw(mostly([data_dim], [1, data_dim + 1]))
    dtype = draw(st.sampled_from(["float32", "float64", "int64", "int32", "bool"]))
    values = np.asarray(draw(st.lists(st.floats(-3, 3), min_size=rows * cols,
                                      max_size=rows * cols)), dtype=np.float64)
    array = values.reshape(rows, cols)
    if dtype.startswith("float") and array.size and draw(st.integers(0, 3)) == 0:
        where = draw(st.integers(0, array.size - 1))
        array.flat[where] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    array = array.astype(dtype) if dtype != "bool" else array > 0
    if draw(st.booleans()):
        return torch.from_numpy(np.ascontiguousarray(array))
    if draw(st.integers(0, 5)) == 0 and rows:
        return array[0]  # one dimension: a wrong rank
    return array


def mostly(valid: list, invalid: list):
    """Valid values four times as often as invalid ones, so that most examples reach
    the work and not only the checks."""
    return st.sampled_from(valid * 4 + invalid)


counts = mostly([1, 2, 3, np.int64(2)], [0, -1, 1.5, True, None, "2"])
seeds = mostly([None, 0, 7, np.int32(3)], [-1, 2**63, 1.5, "0", True])
rates = mostly([1e-2, 1e-3, 1], [0.0, -1e-2, math.nan, math.inf, "0.1", None])
families = mostly(["diag", "full", "flow"], ["iaf", None, 3, "DIAG"])


def _ppca():
    torch.manual_seed(0)
    return PPCA(D, 2), LinearEncoder(D, 2)


def _vae():
    torch.manual_seed(0)
    return VAE(D, 2, hidden=(4,)), MLPEncoder(D, 2, hidden=(4,))


def function_model(x):
    """A model as Pyro users write it: a function of x, its own plate name."""
    with pyro.plate("N", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        loc = z @ torch.ones(2, D) / 2
        pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x)


def function_guide(x):
    with pyro.plate("N", x.shape[0]):
        pyro.sample("z", dist.Normal(x[:, :2] * 0.1, 0.5).to_event(1))


PROGRAMS = {"ppca": _ppca, "vae": _vae,
            "function": lambda: (function_model, function_guide)}
programs = st.sampled_from(sorted(PROGRAMS))


@SETTINGS
@given(name=programs, x=datasets(), num_samples=counts, seed=seeds,
       estimator=st.sampled_from(["log_marginal", "elbo", "log_weights"]))
def test_estimators_give_finite_numbers_or_refuse(name, x, num_samples, seed, estimator):
    model, guide = PROGRAMS[name]()
    fn = getattr(ppl_vae, estimator)
    result = outcome(lambda: fn(model, guide, x, num_samples, seed=seed, progress=False))
    if result is not None:
        assert all_finite(result)


@SETTINGS
@given(name=programs, x=datasets(), num_samples=counts, seed=seeds,
       proposal=mostly(["guide", "prior"], ["posterior", None, 1]),
       idx=mostly([None, "arange"], ["negative", "too_many", "float"]))
def test_diagnostics_and_log_weights_arguments(name, x, num_samples, seed, proposal, idx):
    model, guide = PROGRAMS[name]()
    n = len(x) if getattr(x, "ndim", 0) == 2 else 0
    index = {None: None, "arange": torch.arange(n), "negative": -torch.ones(n).long(),
             "too_many": torch.arange(n + 1), "float": torch.arange(n).double()}[idx]
    lw = outcome(lambda: ppl_vae.log_weights(model, guide, x, num_samples, proposal=proposal,
                                             idx=index, seed=seed, progress=False))
    if lw is not None:
        assert all_finite(lw)
    d = outcome(lambda: ppl_vae.diagnostics(model, guide, x, num_samples, seed=seed,
                                            progress=False))
    if d is not None:
        assert all_finite(d.log_marginal, d.elbo, d.ess)


@SETTINGS
@given(name=programs, x=datasets(), lr=rates, seed=seeds,
       batch_size=mostly([None, 1, 2, 100], [0, 1.0]),
       steps=mostly([1, 2], [0, -3, 1.5, None]))
def test_fit_trains_or_refuses(name, x, lr, seed, batch_size, steps):
    model, guide = PROGRAMS[name]()
    result = outcome(lambda: ppl_vae.fit(model, guide, x, num_steps=steps, lr=lr, seed=seed,
                                         batch_size=batch_size, progress=False))
    if result is not None:
        assert all_finite(result.history)
        assert all_finite(*[p.detach() for p in guide.parameters()]) if isinstance(
            guide, torch.nn.Module) else True


@SETTINGS
@given(name=programs, x=datasets(), family=families, lr=rates, seed=seeds,
       steps=mostly([1, 2], [0, -1, 2.5]),
       num_particles=mostly([1, 2], [0, None]),
       batch_size=mostly([None, 1, 5], [0]))
def test_fit_local_fits_or_refuses(name, x, family, lr, seed, steps, num_particles,
                                   batch_size):
    model, _ = PROGRAMS[name]()
    guide = outcome(lambda: ppl_vae.fit_local(
        model, x, family, steps=steps, lr=lr, seed=seed, num_particles=num_particles,
        batch_size=batch_size, progress=False))
    if guide is not None:
        assert all_finite(*[p.detach() for p in guide.parameters()])


@SETTINGS
@given(name=programs, x=datasets(), seed=seeds, num_samples=counts,
       log_px=mostly(["auto", "exact", "is", "ais"], ["nope"]),
       local=mostly([None, "diag", "full", "flow"], ["x"]),
       local_steps=mostly([1, 2], [0]))
def test_gaps_reports_or_refuses(name, x, seed, num_samples, log_px, local, local_steps):
    model, guide = PROGRAMS[name]()
    report = outcome(lambda: ppl_vae.gaps(
        model, guide, x, local=local, num_samples=num_samples, local_steps=local_steps,
        log_px=log_px, ais_steps=2, ais_chains=2, seed=seed, progress=False))
    if report is not None:
        assert all_finite(report.log_px, report.elbo_local, report.elbo_amortized,
                          report.approximation_gap, report.amortization_gap)


@SETTINGS
@given(name=programs, x=datasets(), seed=seeds,
       proposal=mostly([None, "guide", "local"], ["text"]),
       num_steps=mostly([1, 2], [0, -1, 1.5]),
       num_chains=mostly([1, 2], [0, None]),
       step_size=mostly([0.05], [0.0, -1.0, math.nan]))
def test_ais_estimates_or_refuses(name, x, seed, proposal, num_steps, num_chains, step_size):
    model, guide = PROGRAMS[name]()
    if proposal == "guide":
        proposal = guide
    elif proposal == "local":
        proposal = outcome(lambda: ppl_vae.fit_local(model, x, "diag", steps=1, seed=0,
                                                     progress=False))
    result = outcome(lambda: ppl_vae.ais(
        model, x, proposal=proposal, num_steps=num_steps, num_chains=num_chains,
        leapfrog_steps=1, step_size=step_size, seed=seed, progress=False))
    if result is not None:
        assert all_finite(result.log_marginal)


@SETTINGS
@given(name=mostly(["digits"], ["mnist", "nope", 3, None]),
       split=mostly(["train", "test"], ["valid", "x", None]),
       limit=mostly([None, 1, 5], [0, -1, 2.5, True]),
       binarize=mostly([None, "static", "dynamic"], ["x"]),
       seed=mostly([0, 3], [-1, None, 1.5]),
       root=mostly([None], ["/nonexistent/ppl-vae-data"]))
def test_load_dataset_arguments(name, split, limit, binarize, seed, root):
    x = outcome(lambda: ppl_vae.load_dataset(name, split, root=root, binarize=binarize,
                                             limit=limit, seed=seed, download=False))
    if x is not None:
        assert x.ndim == 2 and len(x) >= 1 and all_finite(x)
        assert bool(((x >= 0) & (x <= 1)).all())
