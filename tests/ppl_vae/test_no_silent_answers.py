"""No silent wrong answers: NaN densities, frozen traces, runaway training, long work.

Each test fails on the main of before issue 20: NaN came back as an estimate, a random
branch trained one frozen trace, ``lr=0`` and ``lr=1e6`` went through without a word.
"""

from __future__ import annotations

import random

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule

import ppl_vae
from ppl_vae.models.blocks import data_plate
from ppl_vae.programs import as_programs
from ppl_vae.traced import TracedLoss

X = torch.randn(40, 3)


def amortized_guide(x):
    loc = pyro.param("loc_w", lambda: torch.zeros(3))
    with pyro.plate("N", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ loc, 0.5))


def nan_for_negative_z(x):
    with pyro.plate("N", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        # log of a negative number: the likelihood is NaN for about half of the draws
        loc = torch.log(z)[..., None].expand(*z.shape, x.shape[-1])
        pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x)


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("estimate", [
    lambda: ppl_vae.log_marginal(nan_for_negative_z, amortized_guide, X, 50, seed=0),
    lambda: ppl_vae.elbo(nan_for_negative_z, amortized_guide, X, 50, seed=0),
    lambda: ppl_vae.log_marginal(nan_for_negative_z, None, X, 50, proposal="prior", seed=0),
    lambda: ppl_vae.ais(nan_for_negative_z, X, num_steps=3, num_chains=4, seed=0,
                        progress=False),
])
def test_a_nan_likelihood_is_refused_naming_the_site_and_rows(estimate):
    with pytest.raises(ValueError, match=r"model site 'obs' \(datapoints \[0, 1"):
        estimate()


def test_fit_names_a_nan_site_instead_of_blaming_the_learning_rate():
    with pytest.raises(ValueError, match=r"the loss became NaN.*model site 'obs'"):
        ppl_vae.fit(nan_for_negative_z, amortized_guide, X, num_steps=5, progress=False)


def zero_scale_guide(x):
    with pyro.plate("N", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 0.0))


def simple_model(x):
    with pyro.plate("N", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z[..., None].expand(*z.shape, x.shape[-1]), 1.0)
                    .to_event(1), obs=x)


@pytest.mark.parametrize("call", [
    lambda: ppl_vae.log_marginal(simple_model, zero_scale_guide, X, 10),
    lambda: ppl_vae.elbo(simple_model, zero_scale_guide, X, 10),
    lambda: ppl_vae.ais(simple_model, X, proposal=zero_scale_guide, num_steps=2, num_chains=2,
                        progress=False),
    lambda: ppl_vae.gaps(simple_model, zero_scale_guide, X, local="diag", num_samples=4,
                         local_steps=3, progress=False),
])
def test_a_guide_of_scale_zero_is_refused_naming_its_site(call):
    with pytest.raises(ValueError, match="guide site 'z'.*NaN log-density"):
        call()


def gamma_model(x):
    with pyro.plate("N", x.shape[0]):
        rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
        pyro.sample("obs", dist.Poisson(rate[..., None].expand(*rate.shape, x.shape[-1]))
                    .to_event(1), obs=x)


def normal_guide_for_rate(x):
    loc = pyro.param("rate_loc", lambda: torch.tensor(1.0))
    with pyro.plate("N", x.shape[0]):
        pyro.sample("rate", dist.Normal(loc, 1.0))


def test_fit_refuses_a_real_guide_on_a_positive_latent_naming_the_support():
    counts = torch.poisson(torch.ones(30, 2))
    with pytest.raises(ValueError, match=r"guide site 'rate'.*support GreaterThan"):
        ppl_vae.fit(gamma_model, normal_guide_for_rate, counts, num_steps=3, progress=False)


class NoToEvent(PyroModule):
    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", dist.Normal(z.expand(*z.shape[:-1], 3), 1.0), obs=x)


class Guide(PyroModule):
    def forward(self, x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Normal(x.new_zeros(len(x), 1), 1.0).to_event(1))


def test_fit_gives_the_clear_message_for_an_observation_without_to_event():
    with pytest.raises(ValueError, match=r"\.to_event\(n\)"):
        ppl_vae.fit(NoToEvent(), Guide(), X, num_steps=2, progress=False)


@pytest.mark.parametrize("lr", [0, -1.0, float("nan"), float("inf")])
def test_fit_checks_the_learning_rate(lr):
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        ppl_vae.fit(simple_model, amortized_guide, X, num_steps=2, lr=lr, progress=False)


def test_a_runaway_elbo_warns():
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="orders of magnitude lower"):
        ppl_vae.fit(simple_model, amortized_guide, X, num_steps=60, lr=1e6, progress=False)


def random_branch_model(x):
    scale = 0.5 if random.random() < 0.5 else 2.0
    w = pyro.param("w", lambda: torch.ones(3))
    with pyro.plate("N", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z[..., None] * w, scale).to_event(1), obs=x)


def test_a_random_python_branch_falls_back_to_the_plain_loss():
    kwargs = dict(num_steps=30, lr=1e-2, seed=3, progress=False)
    with pytest.warns(UserWarning, match="differs from the plain one .* on fresh draws"):
        traced = ppl_vae.fit(random_branch_model, amortized_guide, X, jit=True, **kwargs)
    pyro.clear_param_store()
    plain = ppl_vae.fit(random_branch_model, amortized_guide, X, jit=False, **kwargs)
    assert traced.history == pytest.approx(plain.history, rel=1e-4)


def test_a_static_model_keeps_its_traced_loss():
    model, guide = as_programs(simple_model, amortized_guide, X, proposal=False)
    loss = TracedLoss(Trace_ELBO(max_plate_nesting=1)(model, guide))
    idx = torch.arange(len(X))
    for _ in range(8):
        loss(X, idx, len(X))
    assert loss.is_traced()


def test_long_estimates_show_a_progress_bar(capsys):
    ppl_vae.log_marginal(simple_model, amortized_guide, X, 4096 * 64, seed=0)  # 64 calls
    assert "importance sampling" in capsys.readouterr().err
    ppl_vae.log_marginal(simple_model, amortized_guide, X, 64, seed=0)
    assert capsys.readouterr().err == ""


def test_refuse_nan_tells_a_nan_from_infinities_of_both_signs():
    from ppl_vae.densities import refuse_nan

    idx = torch.arange(4)
    values = torch.zeros(3, 4)
    values[0, 1], values[2, 3] = float("inf"), float("-inf")  # their sum is NaN
    refuse_nan(values, {}, (3, 4), idx)  # no NaN among the values: nothing to refuse
    values[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"log weights of rows \[2\]"):
        refuse_nan(values, {}, (3, 4), idx)


def test_a_factor_in_the_guide_is_part_of_log_q():
    # z = exp(u), u ~ the exact posterior of log z: q(z) needs the log-Jacobian -sum(u),
    # which the guide states with pyro.factor, as Pyro's docs show. Every log weight is
    # then log p(x) exactly; the factor had been dropped (an error of sum(u) per weight).
    g = torch.Generator().manual_seed(7)
    d, k, sigma = 4, 2, 0.5
    W = torch.randn(d, k, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(20, k, generator=g, dtype=torch.float64) @ W.T + b \
        + sigma * torch.randn(20, d, generator=g, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(
        b, W @ W.T + sigma**2 * torch.eye(d, dtype=torch.float64)).log_prob(x)
    cov = torch.linalg.inv(torch.eye(k, dtype=torch.float64) + W.T @ W / sigma**2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.LogNormal(torch.zeros(k, dtype=x.dtype), 1.0)
                            .to_event(1))
            pyro.sample("obs", dist.Normal(z.log() @ W.T + b, sigma).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            u = pyro.sample("u", dist.MultivariateNormal((x - b) @ W @ cov / sigma**2, cov),
                            infer={"is_auxiliary": True})
            pyro.sample("z", dist.Delta(u.exp(), event_dim=1))
            pyro.factor("log_jacobian", -u.sum(-1), has_rsample=True)

    lw = ppl_vae.log_weights(model, guide, x, 8, seed=0)
    torch.testing.assert_close(lw, exact.expand(8, -1), rtol=0, atol=1e-9)
    torch.testing.assert_close(ppl_vae.elbo(model, guide, x, 8, seed=0), exact, rtol=0,
                               atol=1e-9)
    surgery = ppl_vae.elbo_surgery(model, guide, x, num_samples=8, seed=0)
    assert surgery.summary()["elbo"] == pytest.approx(float(exact.mean()), abs=1e-9)


def test_a_latent_drawn_at_random_given_an_auxiliary_draw_is_refused_as_a_proposal():
    # c ~ N(0, 1) auxiliary, z | c ~ N(c, 1): q(z) is the marginal N(0, 2), which the
    # guide's joint density q(c) q(z | c) does not give. Its weights had been accepted:
    # log p(x) came out 1.9 nats too high, the ELBO above log p(x).
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z[..., None].expand(*z.shape, 3), 1.0).to_event(1),
                        obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Normal(torch.zeros(x.shape[0]), 1.0),
                            infer={"is_auxiliary": True})
            pyro.sample("z", dist.Normal(c, 1.0))

    for estimate in (ppl_vae.log_marginal, ppl_vae.elbo):
        with pytest.raises(ValueError, match=r"latent sites \['z'\] at random alongside"):
            estimate(model, guide, X, 10, seed=0)


def test_fit_refuses_a_hierarchical_guide_whose_objective_passes_log_p_x():
    # z ~ N(0, 1), x | z ~ N(z, 1): log p(x) = log N(x; 0, 2) in closed form. The guide
    # draws a ~ N(0, s) auxiliary, z | a ~ N(x / 2 + a, 0.7): SVI on the joint density
    # gains the entropy of q(a | z) and widens s without end. Plain Pyro SVI shows the
    # objective climbing past log p(x); fit had trained on it and reported it.
    g = torch.Generator().manual_seed(3)
    x = 1.5 * torch.randn(20, 1, generator=g)
    exact = float(dist.Normal(0.0, 2.0**0.5).log_prob(x).mean())

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z[..., None], 1.0).to_event(1), obs=x)

    def guide(x):
        s = pyro.param("aux_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(0.0, s).expand([x.shape[0]]),
                            infer={"is_auxiliary": True})
            pyro.sample("z", dist.Normal(x[..., 0] / 2 + a, 0.7))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(300):
        svi.step(x)
    objective = -sum(pyro.infer.Trace_ELBO(num_particles=200, vectorize_particles=True)
                     .loss(model, guide, x) for _ in range(5)) / 5 / len(x)
    assert objective > exact + 0.3  # Pyro's own objective, well above log p(x)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"latent sites \['z'\] at random alongside"):
        ppl_vae.fit(model, guide, x, num_steps=3, seed=0, progress=False)


def test_a_scale_of_the_model_s_own_is_refused_by_the_estimators():
    # A tempered likelihood (poutine.scale 0.5) had been scored unscaled: -5.55 where the
    # tempered model's log p(x) is -3.76. fit still trains with it, as Pyro's SVI does.
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.poutine.scale(scale=0.5):
                pyro.sample("obs", dist.Normal(z[..., None].expand(*z.shape, 3), 1.0)
                            .to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc_z", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    for estimate in (
            lambda: ppl_vae.log_marginal(model, guide, X, 10, seed=0),
            lambda: ppl_vae.ais(model, X, num_steps=2, num_chains=2, seed=0, progress=False),
            lambda: ppl_vae.fit_local(model, X, "diag", steps=2, seed=0, progress=False)):
        with pytest.raises(ValueError, match=r"scales its site 'obs' by 0.5"):
            estimate()
    ppl_vae.fit(model, guide, X, num_steps=3, seed=0, progress=False)


def _centred_model(x):  # centres each call's rows by their own mean: rows are coupled
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = z[..., None].expand(*z.shape, 3)
        pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x - x.mean(0))


def _plain_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))


def _batch_sized_guide(x):  # a scale that depends on how many rows the call has
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0 / x.shape[0]))


def _plain_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z[..., None].expand(*z.shape, 3), 1.0).to_event(1),
                    obs=x)


@pytest.mark.parametrize("model, guide, role", [(_centred_model, _plain_guide, "model"),
                                                 (_centred_model, None, "model"),
                                                 (_plain_model, _batch_sized_guide, "guide")])
def test_a_program_whose_rows_depend_on_each_other_is_refused(model, guide, role):
    # The library scores rows in padded blocks: a row's number would depend on the rows
    # beside it (1.7 nats off with the batch mean, log 256 with len(x)).
    proposal = "guide" if guide is not None else "prior"
    with pytest.raises(ValueError, match=rf"the {role} .* scores a datapoint differently"):
        ppl_vae.log_marginal(model, guide, X, 10, proposal=proposal, seed=0)
    ppl_vae.log_marginal(_plain_model, _plain_guide, X, 10, seed=0)  # rows apart: fine


def test_obs_mask_is_refused_with_the_way_to_mask_missing_values():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z[..., None].expand(*z.shape, 3)
            pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x,
                        obs_mask=x[:, 0] > -100)  # every row observed; still two sites

    # The model's check comes first: its latent 'obs_unobserved' is masked where observed.
    with pytest.raises(ValueError, match=r"latent site 'obs_unobserved' \(obs_mask=.*"
                                         r"\.mask\(present\)"):
        ppl_vae.log_marginal(model, _plain_guide, X, 10, seed=0)
