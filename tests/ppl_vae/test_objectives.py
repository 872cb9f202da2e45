"""fit's training options: the IWAE objective, KL warm-up, learning-rate schedules
(issue 13, part 2). Checked against closed forms of a PPCA model, not against the code."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule, PyroParam

import ppl_vae
from ppl_vae.guides import LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE
from ppl_vae.objectives import IWAE
from ppl_vae.settings import module_local

N, D, K_LATENT = 60, 5, 2


@pytest.fixture(scope="module")
def ppca():
    """A PPCA model, a fitted then perturbed linear encoder, and data from the model."""
    torch.manual_seed(0)
    model, guide = PPCA(D, K_LATENT, sigma=0.7), LinearEncoder(D, K_LATENT)
    with torch.no_grad():
        model.W.normal_()
        model.mu.normal_()
        x = model.marginal().sample((N,))
    ppl_vae.fit(model, guide, x, num_steps=300, lr=0.05, train_model=False, seed=0,
                progress=False)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, guide, x


@module_local
def iwae_loss(model, guide, x, idx, num_data, k, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(IWAE(k)(model, guide)(x[idx], idx=idx, num_data=num_data))


@module_local
def elbo_loss(model, guide, x, idx, num_data, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(Trace_ELBO(max_plate_nesting=1)(model, guide)(x[idx], idx=idx,
                                                                    num_data=num_data))


def test_iwae_with_one_particle_is_the_elbo(ppca):
    model, guide, x = ppca
    idx = torch.arange(10, 30)
    assert iwae_loss(model, guide, x, idx, N, 1, seed=4) == pytest.approx(
        elbo_loss(model, guide, x, idx, N, seed=4), rel=1e-6)


def bound_on_minibatch(model, guide, x, idx, k, seeds):
    """The IWAE-k bound per datapoint of the minibatch, over several seeds."""
    return np.array([-iwae_loss(model, guide, x, idx, N, k, s) / N for s in seeds])


def test_iwae_on_a_minibatch_rises_to_the_exact_log_likelihood(ppca):
    # On a minibatch the loss is scaled by num_data / batch; Pyro's RenyiELBO puts that
    # scale inside the log-mean-exp, which lands far above log p(x) here.
    model, guide, x = ppca
    idx = torch.arange(0, N, 3)
    with torch.no_grad():
        exact = float(model.marginal().log_prob(x[idx]).mean())
    previous = -math.inf
    for k in (1, 10, 1000):
        values = bound_on_minibatch(model, guide, x, idx, k, seeds=range(8))
        mean, se = values.mean(), values.std(ddof=1) / math.sqrt(len(values))
        assert mean <= exact + 4 * se + 1e-4
        assert mean > previous  # tighter with more particles
        previous = mean
    assert exact - mean < 4 * se + 0.03
    assert exact - bound_on_minibatch(model, guide, x, idx, 1, range(8)).mean() > 0.5


class CoinGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.p = PyroParam(torch.tensor(0.5))

    def forward(self, x, idx=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            pyro.sample("c", dist.Bernoulli(self.p.expand(len(x))))


class CoinModel(PyroModule):
    def forward(self, x, idx=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            c = pyro.sample("c", dist.Bernoulli(0.5 * torch.ones(len(x))))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).to_event(1), obs=x)


def test_iwae_refuses_a_guide_without_reparameterized_samples():
    x = torch.randn(8, 1)
    with pytest.raises(ValueError, match="reparameterized.*'c'"):
        ppl_vae.fit(CoinModel(), CoinGuide(), x, num_steps=1, objective="iwae",
                    num_particles=3, progress=False, jit=False)


def expected_warmup_objective(model, guide, x, beta, samples=20000):
    """E_q[log p(x|z)] - beta KL(q || p) per datapoint from closed forms, and the
    standard error of a Monte Carlo estimate with ``samples`` draws per datapoint."""
    with torch.no_grad():
        q = guide.distribution(x)
        loc, cov = q.mean, torch.diag_embed(q.variance)
        sigma2 = model.sigma.square()
        residual = x - loc @ model.W.T - model.mu
        recon = (-0.5 * D * math.log(2 * math.pi) - 0.5 * D * sigma2.log()
                 - (residual.square().sum(-1)
                    + torch.einsum("ij,njk,ik->n", model.W, cov, model.W)) / (2 * sigma2))
        prior = dist.MultivariateNormal(torch.zeros(K_LATENT), torch.eye(K_LATENT))
        kl = _kl(q, prior)
        # Spread of one draw's terms, estimated from an independent plain sample.
        z = q.sample((500,))
        terms = (dist.Normal(z @ model.W.T + model.mu, sigma2.sqrt()).log_prob(x).sum(-1)
                 + beta * (prior.log_prob(z) - q.log_prob(z)))
        se = float(terms.var(0).sum().sqrt()) / math.sqrt(samples) / len(x)
    return float((recon - beta * kl).mean()), float(kl.mean()), se


def _kl(q, prior):
    mvn = dist.MultivariateNormal(q.mean, torch.diag_embed(q.variance))
    return torch.distributions.kl_divergence(mvn, prior)


@pytest.mark.parametrize("warmup", [None, 4])
def test_kl_warmup_weights_the_latent_sites_by_beta(ppca, warmup):
    model, guide, x = ppca
    beta = 1.0 if warmup is None else 1.0 / warmup  # the first step's weight
    expected, kl, se = expected_warmup_objective(model, guide, x, beta)
    m, g = PPCA(D, K_LATENT), LinearEncoder(D, K_LATENT)
    m.load_state_dict(model.state_dict())
    g.load_state_dict(guide.state_dict())
    result = ppl_vae.fit(m, g, x, num_steps=1, lr=1e-12, num_particles=20000, seed=0,
                         kl_warmup=warmup, progress=False)
    assert abs(result.history[0] - expected) < 4 * se
    assert 0.75 * kl > 20 * se  # a warm-up that weighed nothing would fail the test


def small_vae_setup():
    x = ppl_vae.load_dataset("digits", split="train", binarize="static")[:200]

    def build():
        torch.manual_seed(0)
        return VAE(64, 4, hidden=(32,)), MLPEncoder(64, 4, hidden=(32,))

    return x, build


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_the_traced_loss_follows_the_warmup_weight(objective):
    # beta changes in place between steps; a trace that froze it as a constant would
    # give a different history from the plain loss.
    x, build = small_vae_setup()
    histories = []
    for jit in (True, False):
        result = ppl_vae.fit(*build(), x, num_steps=12, batch_size=50, seed=1, jit=jit,
                             kl_warmup=10, objective=objective, num_particles=3,
                             progress=False)
        histories.append(result.history)
    np.testing.assert_allclose(histories[0], histories[1], rtol=2e-5)


@pytest.mark.parametrize("schedule", ["cosine", "exponential"])
def test_lr_schedule_sets_each_steps_learning_rate(schedule):
    x, build = small_vae_setup()
    optimizers, rates, total = [], [], 9

    def make(params):
        optimizers.append(torch.optim.Adam(params, lr=0.02))
        return optimizers[-1]

    def record(step, elbo):
        rates.append(optimizers[0].param_groups[0]["lr"])

    ppl_vae.fit(*build(), x, num_steps=total, batch_size=100, optimizer=make,
                lr_schedule=schedule, callback=record, progress=False)
    t = np.arange(total) / total
    factor = 0.5 * (1 + np.cos(np.pi * t)) if schedule == "cosine" else 0.1 ** t
    np.testing.assert_allclose(rates, 0.02 * factor, rtol=1e-12)


def test_resume_with_warmup_schedule_and_iwae_is_bit_for_bit(tmp_path):
    x, build = small_vae_setup()
    options = dict(num_steps=16, batch_size=50, seed=2, kl_warmup=6, lr_schedule="cosine",
                   objective="iwae", num_particles=2, progress=False)
    model, guide = build()
    ppl_vae.fit(model, guide, x, **options)
    expected = [p.detach().clone() for p in (*model.parameters(), *guide.parameters())]

    def stop_at(step, elbo):
        if step == 7:
            raise KeyboardInterrupt

    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        ppl_vae.fit(*build(), x, checkpoint=path, callback=stop_at, **options)
    model, guide = build()
    ppl_vae.fit(model, guide, x, checkpoint=path, resume=True, **options)
    for a, b in zip((*model.parameters(), *guide.parameters()), expected, strict=True):
        assert torch.equal(a.detach(), b)


def test_resume_refuses_another_warmup(tmp_path):
    x, build = small_vae_setup()
    path = tmp_path / "run.pt"
    ppl_vae.fit(*build(), x, num_steps=2, batch_size=50, seed=2, kl_warmup=6,
                checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="kl_warmup"):
        ppl_vae.fit(*build(), x, num_steps=4, batch_size=50, seed=2, kl_warmup=3,
                    checkpoint=path, resume=True, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "renyi"}, "objective"),
    ({"num_particles": 0}, "num_particles"),
    ({"kl_warmup": 0}, "kl_warmup"),
    ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"loss": Trace_ELBO(), "objective": "iwae"}, "not both"),
])
def test_bad_training_options_are_refused(kwargs, match):
    x, build = small_vae_setup()
    with pytest.raises(ValueError, match=match):
        ppl_vae.fit(*build(), x, num_steps=1, progress=False, **kwargs)


def test_fit_with_iwae_reaches_the_ppca_maximum_likelihood():
    torch.manual_seed(3)
    truth = PPCA(D, K_LATENT, sigma=0.5)
    with torch.no_grad():
        truth.W.normal_()
    x = truth.marginal().sample((400,))
    best = float(PPCA.from_data(x, K_LATENT).marginal().log_prob(x).mean())
    model, guide = PPCA(D, K_LATENT), LinearEncoder(D, K_LATENT)
    ppl_vae.fit(model, guide, x, epochs=150, batch_size=100, lr=2e-2, seed=0,
                objective="iwae", num_particles=5, lr_schedule="cosine", progress=False)
    with torch.no_grad():
        reached = float(model.marginal().log_prob(x).mean())
    assert best - 0.02 < reached <= best + 1e-4
