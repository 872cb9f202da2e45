import math

import pyro
import pytest
import torch

import ppl_vae
from ppl_vae.data import load_dataset
from ppl_vae.guides import FlowEncoder, MLPEncoder
from ppl_vae.models import VAE
from tests.guides.test_amortized import fit_to_fixed_model, guide_site, mean_field_gap


@pytest.fixture(scope="module")
def binary_digits():
    return load_dataset("digits", "train", binarize="static")


def perturbed(encoder, scale=0.3, seed=0):
    """``encoder`` with every weight moved, so that no coupling layer is the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return encoder


def fresh_log_prob(encoder, x, z):
    """log q(z | x) from a newly built distribution: no cached forward pass, so every
    coupling layer is inverted afresh."""
    with torch.no_grad():
        return encoder.distribution(x).log_prob(z)


# ------------------------------------------------------------------ density and shapes


def test_context_broadcasts_over_the_particle_plate(binary_digits):
    # Samples (K, N, k) from the estimators' particle plate at dim -2; context (N, C).
    pyro.set_rng_seed(0)
    guide = perturbed(FlowEncoder(64, 4, hidden=(16,), flow_hidden=(8,), num_flows=3))
    x = binary_digits[:5]
    q = guide.distribution(x)
    assert q.batch_shape == (5,) and q.event_shape == (4,)
    site = guide_site(guide, x, particles=7)
    z = site["value"].detach()
    assert z.shape == (7, 5, 4)
    log_q = site["fn"].log_prob(site["value"]).detach()
    assert log_q.shape == (7, 5)
    # Particle by particle, with no broadcasting: the same densities.
    one_by_one = torch.stack([fresh_log_prob(guide, x, z[j]) for j in range(7)])
    torch.testing.assert_close(log_q, one_by_one, rtol=0, atol=1e-5)
    # Each particle is conditioned on its own datapoint: the rows differ.
    assert float((log_q[:, 0] - log_q[:, 1]).abs().max()) > 1e-2


def test_log_prob_of_own_samples_equals_log_prob_through_the_inverse(binary_digits):
    pyro.set_rng_seed(1)
    guide = perturbed(FlowEncoder(64, 6, hidden=(16,), flow_hidden=(8,), num_flows=4))
    x = binary_digits[:20]
    with torch.no_grad():
        q = guide.distribution(x)
        z = q.sample((30,))
        cached = q.log_prob(z)  # uses the forward pass's cached inverse
        base = guide.base_distribution(x)
    torch.testing.assert_close(fresh_log_prob(guide, x, z), cached, rtol=0, atol=1e-5)
    # The inverse maps z back to a base draw, and the flow is not the identity.
    with torch.no_grad():
        fresh = guide.distribution(x)
        u = z
        for transform in reversed(fresh.transforms):
            u = transform.inv(u)
        back = u
        for transform in guide.distribution(x).transforms:
            back = transform(back)
    torch.testing.assert_close(back, z, rtol=0, atol=1e-5)
    assert float((base.log_prob(z) - cached).abs().mean()) > 0.1
    assert float((u - z).abs().mean()) > 0.1


def test_density_integrates_to_one():
    # k = 2, one datapoint: the change of variables (log-Jacobians included) is right
    # only if exp(log q) integrates to 1 over the plane.
    pyro.set_rng_seed(2)
    guide = perturbed(FlowEncoder(3, 2, hidden=(8,), flow_hidden=(8,), num_flows=3),
                      scale=0.2).double()
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    grid = torch.linspace(-12, 12, 801, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 2)
    density = fresh_log_prob(guide, x, z).exp().reshape(801, 801)
    cell = float(grid[1] - grid[0]) ** 2
    assert abs(float(density.sum()) * cell - 1.0) < 1e-6
    # ...and it is no Gaussian: the flow moved mass away from its base.
    base = guide.base_distribution(x).log_prob(z).exp().reshape(801, 801)
    assert float((density - base).abs().sum().detach()) * cell > 0.5


def test_without_flows_it_is_the_gaussian_base(binary_digits):
    pyro.set_rng_seed(3)
    x = binary_digits[:10]
    plain = perturbed(FlowEncoder(64, 3, hidden=(16,), num_flows=0))
    mlp = MLPEncoder(64, 3, hidden=(16,))
    mlp.net.load_state_dict(plain.net.state_dict())
    with torch.no_grad():
        q, base = plain.distribution(x), plain.base_distribution(x)
        z = torch.randn(8, 10, 3)
        torch.testing.assert_close(q.log_prob(z), base.log_prob(z), rtol=0, atol=0)
        torch.testing.assert_close(q.log_prob(z), mlp.distribution(x).log_prob(z))
        torch.testing.assert_close(base.base_dist.loc, mlp.distribution(x).base_dist.loc)
    # A new encoder's coupling layers start at the identity: q is its base.
    new = FlowEncoder(64, 3, hidden=(16,), num_flows=3)
    with torch.no_grad():
        torch.testing.assert_close(new.distribution(x).log_prob(z),
                                   new.base_distribution(x).log_prob(z))


def test_one_latent_dim_and_no_hidden_layer():
    pyro.set_rng_seed(4)
    x = torch.randn(4, 5)
    for guide in (FlowEncoder(5, 1, hidden=(8,)), FlowEncoder(5, 3, hidden=())):
        perturbed(guide)
        with torch.no_grad():
            q = guide.distribution(x)
            z = q.sample((6,))
            assert z.shape == (6, 4, guide.latent_dim)
            torch.testing.assert_close(fresh_log_prob(guide, x, z), q.log_prob(z),
                                       rtol=1e-5, atol=1e-5)


def test_refuses_bad_arguments():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_flows"):
            FlowEncoder(8, 2, num_flows=bad)
    for bad in ((), "8", (8, 0)):
        with pytest.raises(ValueError, match="flow_hidden"):
            FlowEncoder(8, 2, flow_hidden=bad)
    with pytest.raises(ValueError, match="activation"):
        FlowEncoder(8, 2, activation="swish")
    with pytest.raises(ValueError, match="latent_dim"):
        FlowEncoder(8, 0)


# ------------------------------------------------------------------------ with the engine


def test_fit_trains_it_traced_or_not(binary_digits, recwarn):
    histories = {}
    for jit in (True, False):
        pyro.set_rng_seed(0)
        model = VAE(64, 3, hidden=(16,))
        guide = FlowEncoder(64, 3, hidden=(16,), flow_hidden=(8,))
        before = [p.detach().clone() for p in guide.parameters()]
        result = ppl_vae.fit(model, guide, binary_digits, epochs=10, batch_size=128,
                             lr=1e-2, seed=0, progress=False, jit=jit)
        histories[jit] = torch.as_tensor(result.history)
        # Every parameter moved, the coupling layers' (started at zero) included.
        assert all(not torch.equal(a, b)
                   for a, b in zip(before, guide.parameters(), strict=True))
    assert not [w for w in recwarn if "plainly" in str(w.message)]  # traced, no fallback
    # The traced loss is the plain one: the same steps, up to float32 rounding.
    torch.testing.assert_close(histories[True], histories[False], rtol=1e-4, atol=0)
    steps = math.ceil(len(binary_digits) / 128)
    first, last = histories[True][:steps], histories[True][-steps:]
    se = math.sqrt(first.var() / steps + last.var() / steps)
    assert float(last.mean() - first.mean()) > 5 * se


@pytest.fixture(scope="module")
def rotated_flow(rotated):
    """A FlowEncoder conditioned on x itself (``hidden=()``), fitted to the rotated PPCA."""
    model, x = rotated
    pyro.set_rng_seed(0)
    encoder = FlowEncoder(10, 2, hidden=(), flow_hidden=(32,)).double()
    return fit_to_fixed_model(model, encoder, x)


def test_flow_encoder_on_a_correlated_posterior(rotated, rotated_flow):
    model, x = rotated
    exact = model.marginal().log_prob(x).detach()
    d = ppl_vae.diagnostics(model, rotated_flow, x, 1000, seed=0)
    # As a proposal: log p(x) within 4 standard errors of the exact value, on average.
    error = float((d.log_marginal - exact).mean())
    se = float(d.log_marginal_se.square().sum().sqrt()) / len(x)
    assert abs(error) < 4 * se, (error, se)
    # ELBO <= log p(x) for every datapoint, up to its Monte Carlo error.
    assert bool((d.elbo <= exact + 4.5 * d.elbo_se).all())
    # Its base is diagonal, yet the flow gets well under the mean-field gap.
    gap = exact - d.elbo
    gap_se = float(gap.std()) / math.sqrt(len(x))
    assert float(gap.mean()) + 3 * gap_se < 0.2 * mean_field_gap(model, x)


def test_flow_encoder_starts_annealed_importance_sampling(rotated, rotated_flow):
    model, x = rotated
    x = x[:8]
    exact = model.marginal().log_prob(x).detach()
    result = ppl_vae.ais(model, x, proposal=rotated_flow, num_steps=20, num_chains=8,
                         seed=0, progress=False)
    error = float((result.log_marginal - exact).mean())
    se = float(result.log_marginal_se.square().sum().sqrt()) / len(x)
    assert abs(error) < 4 * se + 1e-3, (error, se)
