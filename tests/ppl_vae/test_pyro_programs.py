"""Models and guides written as Pyro users write them, through every entry point.

Each number is checked against something independent of the library: a plain PyTorch
computation on the user's own networks, Pyro's own ``Trace_ELBO`` and SVI, a closed form
(linear-Gaussian models), quadrature on a grid (a curved 2-d latent).
"""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

import ppl_vae
from ppl_vae.local_fit import TRACE_FROM_STEPS
from tests.ppl_vae import pyro_styles as styles

SEED = 0


def _store_snapshot() -> dict:
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def _same_store(snapshot: dict) -> bool:
    store = dict(pyro.get_param_store().items())
    return set(store) == set(snapshot) and all(
        torch.equal(store[name].detach(), value) for name, value in snapshot.items())


def _digits(n: int = 200, split: str = "train") -> torch.Tensor:
    return ppl_vae.load_dataset("digits", split=split, binarize="static")[:n]


@pytest.fixture
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _svi_trained_vae(x, steps=150, lr=1e-2, seed=SEED) -> styles.TutorialVAE:
    torch.manual_seed(seed)
    vae = styles.TutorialVAE()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    for _ in range(steps):
        svi.step(x)
    return vae


def _plain_log_weights(vae, x, k, seed) -> torch.Tensor:
    """log p(x, z) - log q(z | x) of the tutorial VAE, by hand: [K, N]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        loc, scale = vae.encode(x)
        z = loc + scale * torch.randn(k, *loc.shape, generator=g)
        q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        probs = vae.decoder(z)
        lik = (x * probs.log() + (1 - x) * (1 - probs).log()).sum(-1)
    return prior + lik - q


def _within(a: torch.Tensor, b: torch.Tensor, se: torch.Tensor, sigmas: float = 4.0):
    """Mean difference of per-datapoint estimates within ``sigmas`` standard errors."""
    diff = float((a - b).mean())
    bound = sigmas * float(se.square().sum().sqrt()) / len(a)
    assert abs(diff) < bound, f"mean difference {diff:.5f} beyond {bound:.5f}"


def test_tutorial_vae_estimates_match_plain_pytorch_and_pyro(clean_store):
    x = _digits()
    vae = _svi_trained_vae(x)
    before = _store_snapshot()
    k = 400
    diag = ppl_vae.diagnostics(vae.model, vae.guide, x, num_samples=k, seed=SEED)
    plain = _plain_log_weights(vae, x, k, seed=1)
    plain_elbo, plain_elbo_se = plain.mean(0), plain.std(0) / math.sqrt(k)
    _within(diag.elbo, plain_elbo, torch.hypot(diag.elbo_se, plain_elbo_se))
    plain_lme = torch.logsumexp(plain, 0) - math.log(k)
    w = (plain - plain_lme).exp()
    plain_lme_se = w.std(0) / math.sqrt(k)
    _within(diag.log_marginal, plain_lme, torch.hypot(diag.log_marginal_se, plain_lme_se))
    # Pyro's own estimator of the same ELBO, summed over the data.
    particles = 200
    pyro.set_rng_seed(2)
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True,
                      max_plate_nesting=1).loss(vae.model, vae.guide, x)
    per_particle_sd = float(plain.sum(1).std())
    assert abs(-loss / len(x) - float(diag.elbo.mean())) < 4 * (
        per_particle_sd / math.sqrt(particles) / len(x) + float(diag.elbo_se.norm()) / len(x))
    assert _same_store(before)


def test_estimators_leave_the_param_store_bit_for_bit(clean_store):
    x = _digits(64)
    vae = _svi_trained_vae(x, steps=30)
    before = _store_snapshot()
    ppl_vae.log_weights(vae.model, vae.guide, x, 8, seed=SEED)
    ppl_vae.log_marginal(vae.model, vae.guide, x, 8)
    ppl_vae.elbo(vae.model, vae.guide, x, 8)
    ppl_vae.ais(vae.model, x[:16], proposal=vae.guide, num_steps=3, num_chains=2,
                progress=False, seed=SEED)
    # Enough steps for fit_local to trace its loss, whose recording must leave it too.
    ppl_vae.fit_local(vae.model, x[:16], "diag", init_from=vae.guide,
                      steps=TRACE_FROM_STEPS, progress=False, seed=SEED)
    ppl_vae.gaps(vae.model, vae.guide, x[:16], local="diag", num_samples=8, local_steps=20,
                 progress=False, seed=SEED)
    ppl_vae.refine(vae.model, vae.guide, x[:16], 10, progress=False, seed=SEED)
    assert _same_store(before)


def test_fit_on_the_tutorial_vae_matches_pyros_own_svi(clean_store):
    x, x_test = _digits(400), _digits(200, split="test")
    torch.manual_seed(3)
    start = styles.TutorialVAE()
    epochs, batch, lr = 15, 100, 3e-3

    reference = copy.deepcopy(start)
    svi = SVI(reference.model, reference.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    order = torch.Generator().manual_seed(4)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=order).split(batch):
            svi.step(x[rows])
    theirs = ppl_vae.elbo(reference.model, reference.guide, x_test, 200, seed=SEED).mean()

    pyro.clear_param_store()
    ours_vae = copy.deepcopy(start)
    ppl_vae.fit(ours_vae.model, ours_vae.guide, x, epochs=epochs, batch_size=batch, lr=lr,
                seed=SEED, progress=False)
    ours = ppl_vae.elbo(ours_vae.model, ours_vae.guide, x_test, 200, seed=SEED).mean()
    assert abs(float(ours - theirs)) < 1.0
    # Trained where Pyro reads it: the network itself, registered in the param store.
    assert not torch.equal(ours_vae.decoder[0].weight, start.decoder[0].weight)
    assert pyro.param("decoder$$$0.weight") is ours_vae.decoder[0].weight


def _linear_start(seed=1):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    x0 = torch.zeros(1, styles.D)
    styles.linear_model(x0)
    styles.linear_guide(x0)


def test_function_model_with_param_store_two_sites_and_plate_n(clean_store):
    x = styles.linear_data(200)
    _linear_start()
    ppl_vae.fit(styles.linear_model, styles.linear_guide, x, epochs=1000, batch_size=50,
                lr=5e-2, lr_schedule="cosine", seed=SEED, progress=False)
    exact = styles.linear_marginal().log_prob(x)
    # ELBO training with a guide that holds the exact posterior at the orthogonal MLE
    # (PPCA's posterior covariance is diagonal there) reaches the maximum likelihood.
    assert float(exact.mean()) == pytest.approx(styles.mle_log_likelihood(x), abs=0.005)
    diag = ppl_vae.diagnostics(styles.linear_model, styles.linear_guide, x, 2000, seed=SEED)
    _within(diag.log_marginal, exact, diag.log_marginal_se)
    report = ppl_vae.gaps(styles.linear_model, styles.linear_guide, x, local="full",
                          num_samples=500, progress=False, seed=SEED)
    # The full family holds the exact posterior: the gap is 0, up to its standard error
    # and what the local optimizer leaves (its plateau rule stops within ~1e-3 nats).
    se = float(report.per_datapoint["approximation_gap_se"].norm()) / len(x)
    assert abs(report.approximation_gap) < 4 * se + 0.005


def test_minibatch_steps_estimate_the_full_data_elbo(clean_store):
    x = styles.linear_data(60)
    _linear_start()
    pyro.set_rng_seed(5)
    particles = 20000
    full = -Trace_ELBO(num_particles=particles, vectorize_particles=True,
                       max_plate_nesting=1).loss(styles.linear_model, styles.linear_guide, x)
    steps = 3000
    result = ppl_vae.fit(styles.linear_model, styles.linear_guide, x, num_steps=steps,
                         batch_size=6, optimizer=lambda p: torch.optim.SGD(p, lr=1e-30),
                         seed=SEED, progress=False)
    history = torch.as_tensor(result.history)
    se = float(history.std()) / math.sqrt(steps)
    assert abs(float(history.mean()) - full / len(x)) < 4 * se + 1e-3


def test_resume_is_bit_for_bit_for_param_store_parameters(clean_store, tmp_path):
    x = styles.linear_data(80)
    kwargs = dict(batch_size=20, lr=1e-2, seed=SEED, progress=False)
    _linear_start()
    ppl_vae.fit(styles.linear_model, styles.linear_guide, x, num_steps=40, **kwargs)
    straight = _store_snapshot()
    _linear_start()
    path = tmp_path / "run.pt"
    ppl_vae.fit(styles.linear_model, styles.linear_guide, x, num_steps=20, checkpoint=path,
                **kwargs)
    _linear_start(seed=9)  # a different state: resume must bring back every value
    ppl_vae.fit(styles.linear_model, styles.linear_guide, x, num_steps=40, checkpoint=path,
                resume=True, **kwargs)
    assert _same_store(straight)


def test_forward_x_module_ais_against_quadrature():
    torch.manual_seed(6)
    module = styles.BananaModule()
    with torch.no_grad():
        z = torch.randn(12, 2)
        loc = torch.stack([z[:, 0], z[:, 1] + 1.5 * z[:, 0] ** 2], -1)
        x = loc + 0.4 * torch.randn(12, 2)
    exact = module.log_marginal_by_quadrature(x).float()
    result = ppl_vae.ais(module, x, num_steps=300, num_chains=32, progress=False, seed=SEED)
    _within(result.log_marginal, exact, result.log_marginal_se)
    assert ((result.log_marginal - exact).abs() < 5 * result.log_marginal_se).all()


def _posterior_means(x) -> torch.Tensor:
    """E[(a, e) | x_n] of linear_model in closed form: shape (N, 3)."""
    W, w, b = (pyro.param(n).detach() for n in ("W", "w", "b"))
    sigma2 = pyro.param("sigma").detach() ** 2
    M = torch.cat([W, w[:, None]], 1)
    precision = torch.eye(3) + M.T @ M / sigma2
    return torch.linalg.solve(precision, M.T @ (x - b).T / sigma2).T


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDiagonalNormal])
def test_mean_field_autoguides_are_per_datapoint_guides(clean_store, autoguide):
    x = styles.linear_data(120)
    _linear_start()
    guide = autoguide(styles.linear_model)
    # Minibatches: the library drives the guide's rows, so row n stays datapoint n.
    ppl_vae.fit(styles.linear_model, guide, x, epochs=400, batch_size=40, lr=3e-2,
                train_model=False, seed=SEED, progress=False)
    view = ppl_vae.programs.as_guide(guide, ppl_vae.programs.as_model(styles.linear_model, x), x)
    loc, _ = view.parameters_u()
    truth = _posterior_means(x)
    assert torch.corrcoef(torch.stack([loc.flatten(), truth.flatten()]))[0, 1] > 0.99
    exact = styles.linear_marginal().log_prob(x)
    diag = ppl_vae.diagnostics(styles.linear_model, guide, x, 2000, seed=SEED)
    _within(diag.log_marginal, exact, diag.log_marginal_se)
    assert float((exact - diag.elbo).mean()) > 0  # mean field: a strict lower bound here
    rows = torch.arange(30)
    result = ppl_vae.ais(styles.linear_model, x[:30], proposal=guide, idx=rows, num_data=len(x),
                         num_steps=50, num_chains=8, progress=False, seed=SEED)
    _within(result.log_marginal, exact[:30], result.log_marginal_se)
    local = ppl_vae.fit_local(styles.linear_model, x, "diag", init_from=guide, steps=30,
                              progress=False, seed=SEED)
    # Started from the autoguide's rows, moments of its draws.
    assert torch.corrcoef(torch.stack([local.loc.flatten(), truth.flatten()]))[0, 1] > 0.98


def test_refusals_for_pyro_programs(clean_store):
    x = styles.linear_data(20)
    _linear_start()
    model, guide = styles.linear_model, styles.linear_guide
    with pytest.raises(ValueError, match="model must be a Pyro program"):
        ppl_vae.elbo(42, guide, x)
    with pytest.raises(ValueError, match="takes no data argument"):
        ppl_vae.elbo(lambda: None, guide, x)
    with pytest.raises(ValueError, match="couples them"):
        ppl_vae.log_marginal(model, AutoMultivariateNormal(model), x, 4)
    with pytest.raises(ValueError, match="cannot be trained on minibatches"):
        ppl_vae.fit(model, AutoMultivariateNormal(model), x, num_steps=1, batch_size=5,
                    progress=False)
    with pytest.raises(ValueError, match="is not a plate around"):
        ppl_vae.elbo(model, guide, x, plate="rows")

    def no_plate(x):
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([len(x), 2]).to_event(2))
        pyro.sample("obs", dist.Normal(0.0, 1.0).expand(x.shape).to_event(2), obs=x)

    with pytest.raises(ValueError, match="no plate around the model's observed sites"):
        ppl_vae.log_marginal(no_plate, None, x, 4, proposal="prior")

    square = torch.randn(4, 4)

    def two_plates(x):
        with pyro.plate("rows", 4, dim=-2), pyro.plate("cols", 4, dim=-1):
            pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="several plates"):
        ppl_vae.log_marginal(two_plates, None, square, 4, proposal="prior")

    def outer_dim(x):
        with pyro.plate("N", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(1))
            pyro.sample("obs", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1),
                        obs=x[:, None, :2])

    with pytest.raises(ValueError, match="at dim -2"):
        ppl_vae.log_marginal(outer_dim, None, x, 4, proposal="prior")

    def bernoulli(x):
        with pyro.plate("N", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Bernoulli(logits=z[..., None].expand(x.shape)).to_event(1),
                        obs=x)

    with pytest.raises(ValueError, match="outside the support"):
        ppl_vae.log_marginal(bernoulli, None, torch.rand(10, 3), 4, proposal="prior")

    def global_latent(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("N", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, 1.0).expand(x.shape).to_event(1), obs=x)

    with pytest.raises(ValueError, match="outside the 'data' plate"):
        ppl_vae.log_marginal(global_latent, None, x, 4, proposal="prior")

    def no_event(x):
        with pyro.plate("N", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z[..., None].expand(x.shape), 1.0), obs=x)

    def z_guide(x):
        with pyro.plate("N", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"to_event"):
        ppl_vae.fit(no_event, z_guide, x, num_steps=1, progress=False)

    def half_guide(x):
        with pyro.plate("N", x.shape[0]):
            pyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    with pytest.raises(ValueError, match=r"\['e'\] have no site in the guide"):
        ppl_vae.fit(model, half_guide, x, num_steps=1, progress=False)

    def extra_guide(x):
        with pyro.plate("N", x.shape[0]):
            pyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("e", dist.Normal(0.0, 1.0))
            pyro.sample("stray", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"\['stray'\] that are not latent sites"):
        ppl_vae.elbo(model, extra_guide, x, 4)

    def discrete(x):
        with pyro.plate("N", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("obs", dist.Normal(k[..., None].expand(x.shape), 1.0).to_event(1),
                        obs=x)

    with pytest.raises(ValueError, match="discrete support"):
        ppl_vae.log_marginal(discrete, None, x, 4, proposal="prior")


def test_a_stale_network_in_the_param_store_is_refused(clean_store):
    x = _digits(32)
    first, second = styles.TutorialVAE(), styles.TutorialVAE()
    ppl_vae.elbo(first.model, first.guide, x, 4)
    first.model(x)  # registers "decoder$$$..." in the store, as Pyro's SVI would
    with pytest.raises(ValueError, match="already holds 'decoder"):
        ppl_vae.elbo(second.model, second.guide, x, 4)


def test_sample_from_a_function_model(clean_store):
    x = styles.linear_data(50)
    _linear_start()
    drawn, latents = ppl_vae.sample_from_model(styles.linear_model, 4000, like=x, seed=SEED)
    assert set(latents) == {"a", "e"} and latents["a"].shape == (4000, 2)
    marginal = styles.linear_marginal()
    # The draws' mean and covariance against p(x) in closed form.
    se_mean = marginal.covariance_matrix.diagonal().sqrt() / math.sqrt(len(drawn))
    assert ((drawn.mean(0) - marginal.mean).abs() < 4 * se_mean).all()
    with pytest.raises(ValueError, match="needs like="):
        ppl_vae.sample_from_model(styles.linear_model, 10)


def test_signatures_are_read_per_function_and_bound_method():
    from ppl_vae.programs import _parameters_of

    class Module(torch.nn.Module):
        def forward(self, x, idx=None, num_data=None):
            return x

    class Unhashable:
        __hash__ = None

        def __call__(self, x, y):
            return x

    first, second = Module(), Module()
    assert list(_parameters_of(first.forward)) == ["x", "idx", "num_data"]
    assert list(_parameters_of(second.forward)) == ["x", "idx", "num_data"]
    assert list(_parameters_of(Module.forward)) == ["self", "x", "idx", "num_data"]
    second.forward = lambda x: x  # a replaced forward is read again
    assert list(_parameters_of(second.forward)) == ["x"]
    assert list(_parameters_of(Unhashable())) == ["x", "y"]


@pytest.mark.parametrize("programs", ["functions", "library modules"])
def test_a_seeded_call_leaves_every_random_state_alone(clean_store, programs):
    # A function model is traced at the boundary to find its data plate (it draws); the
    # library's modules pass through untouched. Either way torch's, Python's and numpy's
    # generators are where the caller left them.
    import random

    import numpy as np

    from ppl_vae.guides import LinearEncoder
    from ppl_vae.models import PPCA

    x = styles.linear_data(20)
    if programs == "functions":
        _linear_start()
        model, guide = styles.linear_model, styles.linear_guide
    else:
        model, guide = PPCA(styles.D, 2), LinearEncoder(styles.D, 2)
    pyro.set_rng_seed(11)
    expected = (torch.rand(2), random.random(), np.random.rand())
    pyro.set_rng_seed(11)
    ppl_vae.log_marginal(model, guide, x, 20, seed=3)
    ppl_vae.elbo(model, guide, x, 5, seed=4)
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
