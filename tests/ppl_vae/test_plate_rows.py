"""A plate sized by x.shape[0] indexes the dataset's rows, as in a call on all of x.

The library runs programs on blocks of rows. The usual Pyro pattern of per-datapoint
parameters, ``pyro.param("loc", torch.zeros(N, k))[ind]`` inside ``pyro.plate("data",
x.shape[0]) as ind``, must then still read each row's own values: before, every block
read rows 0..15 (a silent 440-nat error on row 16 on). Indexing x itself with the
plate's indices is refused, since x holds only a block's rows.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_vae
from ppl_vae.plate_rows import PlateRows, marked

N, D, K, SIGMA = 40, 3, 2, 0.5  # 40 rows: three blocks of 16


@pytest.fixture
def problem(clean_store):
    """x_n = offset_n + W z_n + noise: exact log p(x_n), posterior means and covariance."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, K, generator=g, dtype=torch.float64)
    offset = 3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    x = offset + torch.randn(N, K, generator=g, dtype=torch.float64) @ W.T \
        + SIGMA * torch.randn(N, D, generator=g, dtype=torch.float64)
    cov = W @ W.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(offset, cov).log_prob(x)
    precision = torch.eye(K, dtype=torch.float64) + W.T @ W / SIGMA**2
    post_cov = torch.linalg.inv(precision)
    post_mean = (x - offset) @ W / SIGMA**2 @ post_cov
    return W, offset, x, exact, post_mean, post_cov


@pytest.fixture
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def programs(W, offset, post_mean, post_cov):
    def model(x):
        off = pyro.param("offset", offset.clone())  # per datapoint: N rows
        with pyro.plate("data", x.shape[0]) as ind:
            z = pyro.sample("z", dist.Normal(torch.zeros(K, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(off[ind] + z @ W.T, SIGMA).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", post_mean.clone())
        with pyro.plate("data", x.shape[0]) as ind:
            pyro.sample("z", dist.MultivariateNormal(loc[ind], post_cov))

    return model, guide


def test_per_datapoint_parameters_indexed_by_the_plate_read_their_own_rows(problem):
    W, offset, x, exact, post_mean, post_cov = problem
    model, guide = programs(W, offset, post_mean, post_cov)
    # The exact posterior as the proposal: every log weight is log p(x_n), for every row.
    lw = ppl_vae.log_weights(model, guide, x, 5, seed=0)
    torch.testing.assert_close(lw, exact.expand(5, -1), rtol=0, atol=1e-9)
    # A subset of the dataset's rows, told which they are.
    part = ppl_vae.log_marginal(model, guide, x[20:], 5, seed=0, idx=torch.arange(20, N),
                                num_data=N)
    torch.testing.assert_close(part, exact[20:], rtol=0, atol=1e-9)


def test_fit_trains_each_row_s_own_parameters(problem):
    W, offset, x, _, post_mean, post_cov = problem
    model, _ = programs(W, offset, post_mean, post_cov)

    def guide(x):  # the posterior's covariance, each row's mean learnt from zero
        loc = pyro.param("loc", torch.zeros(N, K, dtype=torch.float64))
        with pyro.plate("data", x.shape[0]) as ind:
            pyro.sample("z", dist.MultivariateNormal(loc[ind], post_cov))

    ppl_vae.fit(model, guide, x, num_steps=3000, batch_size=8, lr=5e-2, train_model=False,
                lr_schedule="cosine", seed=0, progress=False)
    error = (pyro.param("loc").detach() - post_mean).abs()
    # Each row was in 600 minibatches, with the rate on a cosine to zero: the largest
    # error is 0.05 (mean 0.015). A row trained on another's minibatch slot would be off
    # by the spread of the true means, above 1.
    assert float(post_mean.std()) > 1.0
    assert float(error.max()) < 0.15


def test_a_function_in_the_library_s_signature_is_told_its_rows(problem):
    W, offset, x, exact, post_mean, post_cov = problem

    def model(x, idx=None, num_data=None):
        idx = torch.arange(len(x)) if idx is None else idx
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(K, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(offset[idx] + z @ W.T, SIGMA).to_event(1), obs=x)

    def guide(x, idx=None, num_data=None):
        idx = torch.arange(len(x)) if idx is None else idx
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(post_mean[idx], post_cov))

    lw = ppl_vae.log_weights(model, guide, x, 3, seed=0)
    torch.testing.assert_close(lw, exact.expand(3, -1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("index", [
    lambda x, ind: x[ind],
    lambda x, ind: x[ind, :],
    lambda x, ind: x[..., ind, :],
    lambda x, ind: torch.index_select(x, 0, ind),
    lambda x, ind: x.index_select(0, ind),
    lambda x, ind: x[ind + 0],  # computed from the indices
])
def test_indexing_the_data_with_the_plate_s_indices_is_refused(problem, index):
    W, offset, x, _, post_mean, post_cov = problem
    _, guide = programs(W, offset, post_mean, post_cov)

    def model(x):
        with pyro.plate("data", x.shape[0]) as ind:
            z = pyro.sample("z", dist.Normal(torch.zeros(K, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, SIGMA).to_event(1), obs=index(x, ind))

    with pytest.raises(ValueError, match=r"not x\[ind\]"):
        ppl_vae.log_marginal(model, guide, x, 5, seed=0)


def test_a_per_datapoint_parameter_made_from_the_call_s_rows_is_refused(problem):
    W, offset, x, _, post_mean, post_cov = problem
    model, _ = programs(W, offset, post_mean, post_cov)

    def guide(x):  # sized by whatever rows the first call had: not one per datapoint
        loc = pyro.param("loc", lambda: torch.zeros(x.shape[0], K, dtype=x.dtype))
        with pyro.plate("data", x.shape[0]) as ind:
            pyro.sample("z", dist.MultivariateNormal(loc[ind], post_cov))

    with pytest.raises(ValueError, match=r"along a dim of 1, not the dataset's 40 rows"):
        ppl_vae.elbo(model, guide, x, 5, seed=0)


def test_the_indices_are_marked_only_while_the_boundary_checks():
    idx = torch.arange(3)
    assert type(marked(idx)) is torch.Tensor
    with ppl_vae.plate_rows.checked_indexing(10):
        rows = marked(idx)
        assert isinstance(rows, PlateRows)
        assert float(torch.zeros(10)[rows].sum()) == 0.0  # a per-datapoint array: fine
        with pytest.raises(ValueError):
            torch.zeros(5)[rows]
    assert math.isfinite(float(torch.zeros(5)[rows].sum()))  # outside a check: unchecked
