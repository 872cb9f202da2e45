"""Pyro idioms at the boundary: ``pyro.deterministic`` records and plates that
subsample themselves.

A ``pyro.deterministic`` is an observed, masked Delta site to Pyro. Outside the plate it
had been refused as data outside the plate; now the engine never sees it, and a model
with such records gives the numbers of the same model without them. A plate with its
own ``subsample_size`` had failed inside Pyro ("subsample_size does not match
len(subsample)"); it is refused in words, since the library picks each call's rows.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_vae
from tests.ppl_vae import pyro_styles as styles


def recording_model(x):
    """styles.linear_model with records outside and inside the plate."""
    W = pyro.param("W", lambda: torch.randn(styles.D, 2))
    pyro.deterministic("W_norm", W.norm())
    w = pyro.param("w", lambda: torch.randn(styles.D))
    b = pyro.param("b", lambda: torch.zeros(styles.D))
    sigma = pyro.param("sigma", lambda: torch.tensor(1.0),
                       constraint=dist.constraints.positive)
    with pyro.plate("N", x.shape[0]):
        a = pyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        e = pyro.sample("e", dist.Normal(0.0, 1.0))
        loc = pyro.deterministic("loc", a @ W.T + e[..., None] * w + b, event_dim=1)
        pyro.deterministic("a_sum", a.sum(-1))
        pyro.sample("obs", dist.Normal(loc, sigma).to_event(1), obs=x)


@pytest.fixture
def store():
    pyro.clear_param_store()
    torch.manual_seed(1)
    x0 = torch.zeros(1, styles.D)
    styles.linear_model(x0)
    styles.linear_guide(x0)
    yield
    pyro.clear_param_store()


def test_deterministic_records_change_no_number(store):
    x = styles.linear_data(30)
    exact = styles.linear_marginal().log_prob(x)
    for estimate in (ppl_vae.log_marginal, ppl_vae.elbo):
        plain = estimate(styles.linear_model, styles.linear_guide, x, 64, seed=0)
        recorded = estimate(recording_model, styles.linear_guide, x, 64, seed=0)
        assert torch.equal(plain, recorded)
    a = ppl_vae.ais(styles.linear_model, x[:6], num_steps=5, num_chains=2, seed=0,
                    progress=False)
    b = ppl_vae.ais(recording_model, x[:6], num_steps=5, num_chains=2, seed=0, progress=False)
    assert torch.equal(a.log_weights, b.log_weights)
    # and the numbers are right: log p(x) in closed form, within AIS's standard error
    # (at 300 steps on three latent dims its downward bias is far below that)
    run = ppl_vae.ais(recording_model, x[:6], num_steps=300, num_chains=32, seed=0,
                      progress=False)
    assert float(run.log_marginal_se.max()) < 0.2  # 0.05-0.15 here
    assert bool(((run.log_marginal - exact[:6]).abs() < 4 * run.log_marginal_se).all())


def test_fit_with_deterministic_records_follows_the_plain_model(store):
    x = styles.linear_data(40)
    start = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    plain = ppl_vae.fit(styles.linear_model, styles.linear_guide, x, num_steps=20, seed=0,
                        progress=False, jit=False).history
    for name, value in start.items():
        pyro.get_param_store()[name] = value.clone()
    recorded = ppl_vae.fit(recording_model, styles.linear_guide, x, num_steps=20, seed=0,
                           progress=False, jit=False).history
    assert list(plain) == list(recorded)


def subsampling_model(x):
    with pyro.plate("data", x.shape[0], subsample_size=10) as rows:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z[..., None].expand(*z.shape, 3), 1.0).to_event(1),
                    obs=x[rows])


def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.3 * x[:, 0], 0.9))


@pytest.mark.parametrize("call", [
    lambda x: ppl_vae.fit(subsampling_model, guide, x, num_steps=2, progress=False),
    lambda x: ppl_vae.log_marginal(subsampling_model, guide, x, 10, seed=0),
    lambda x: ppl_vae.ais(subsampling_model, x, num_steps=2, num_chains=2, progress=False),
    lambda x: ppl_vae.fit_local(subsampling_model, x, "diag", steps=2, progress=False),
], ids=["fit", "log_marginal", "ais", "fit_local"])
def test_a_plate_that_subsamples_itself_is_refused_in_words(call):
    with pytest.raises(ValueError, match=r"plate 'data' subsamples itself \(subsample_size=10"):
        call(torch.randn(40, 3))
