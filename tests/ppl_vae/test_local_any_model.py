"""Local guides, fit_local and gaps on models a user writes: several latent sites, any
event shape, constrained supports, curved posteriors. Each model here has an exact
log p(x) (closed form or quadrature) to check against."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import ppl_vae
from ppl_vae.guides import FlowEncoder, LocalDiag, LocalFlow, LocalFull, MLPEncoder
from ppl_vae.models import VAE
from ppl_vae.models.blocks import data_plate

# Slack for the local fit's optimization shortfall, in nats per datapoint, on top of 3
# standard errors: Adam on Monte Carlo gradients stops a little short of the optimum
# (measured ~0.003 nats for "full" on the chain model); everything else is exact.
OPTIMIZATION_SLACK = 0.01
NUM_SAMPLES = 2000


def mean_se(se: torch.Tensor) -> float:
    """Standard error of a mean over datapoints from their per-datapoint Monte Carlo se."""
    return float(se.square().sum().sqrt()) / len(se)


# ------------------------------------------------------------- two-site linear chain


class Chain(PyroModule):
    """h1 ~ N(0, I_2), h2 | h1 ~ N(A h1, s2^2 I_2), x | h2 ~ N(B h2 + c, s^2 I_5)."""

    def __init__(self, A, B, c, s2, s):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.register_buffer("c", c)
        self.s2, self.s, self.data_dim = s2, s, B.shape[0]

    def forward(self, x=None, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            h1 = pyro.sample("h1", dist.Normal(self.c.new_zeros(self.A.shape[1]), 1.0)
                             .to_event(1))
            h2 = pyro.sample("h2", dist.Normal(h1 @ self.A.T, self.s2).to_event(1))
            return pyro.sample("x", dist.Normal(h2 @ self.B.T + self.c, self.s).to_event(1),
                               obs=x)

    def prior_precision_and_map(self):
        """Precision of the joint prior of z = [h1, h2], and M with E[x | z] = M z + c.

        -log p(h1, h2) = |h1|^2 / 2 + |h2 - A h1|^2 / (2 s2^2) + const, a quadratic
        form in z whose matrix is the precision below.
        """
        a, b = self.A.shape[1], self.A.shape[0]
        A, v = self.A, self.s2**2
        top = torch.cat([torch.eye(a, dtype=A.dtype) + A.T @ A / v, -A.T / v], 1)
        bottom = torch.cat([-A / v, torch.eye(b, dtype=A.dtype) / v], 1)
        M = torch.cat([torch.zeros(len(self.B), a, dtype=A.dtype), self.B], 1)
        return torch.cat([top, bottom], 0), M

    def posterior_precision(self):
        """P = prior precision + M^T M / s^2: x is linear in z, so p(z | x) is Gaussian."""
        precision, M = self.prior_precision_and_map()
        return precision + M.T @ M / self.s**2

    def marginal(self):
        """x ~ N(c, M Sigma_0 M^T + s^2 I), Sigma_0 the joint prior covariance.

        (With this method gaps() takes log p(x) exact instead of importance sampled.)
        """
        precision, M = self.prior_precision_and_map()
        cov = M @ torch.linalg.inv(precision) @ M.T + self.s**2 * torch.eye(len(M), dtype=M.dtype)
        return torch.distributions.MultivariateNormal(self.c, cov)

    def log_marginal(self, x):
        return self.marginal().log_prob(x)


class ChainGuide(PyroModule):
    """A user's own amortized guide for the chain: two sites, no `family` attribute.

    Mean field (independent Normals, linear in x), so its family is that of "diag".
    """

    def __init__(self, data_dim):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(data_dim, 8).double()
        with torch.no_grad():
            self.net.weight.mul_(0.1)
            self.net.bias.zero_()

    def forward(self, x, idx=None, num_data=None):
        loc1, loc2, raw1, raw2 = self.net(x).chunk(4, -1)
        with data_plate(x, idx, num_data):
            pyro.sample("h1", dist.Normal(loc1, raw1.exp()).to_event(1))
            pyro.sample("h2", dist.Normal(loc2, raw2.exp()).to_event(1))


@pytest.fixture(scope="module")
def chain():
    A = torch.tensor([[1.5, 0.5], [-0.8, 1.2]], dtype=torch.float64)
    B = torch.tensor([[1.0, 0.9], [0.5, 1.1], [1.2, -0.3], [0.2, 0.8], [0.9, 0.7]],
                     dtype=torch.float64)
    c = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    model = Chain(A, B, c, s2=0.5, s=0.7)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        x = model(None, num_data=200)
    return model, x


def chain_mean_field_gap(model) -> float:
    """KL of the best diagonal Gaussian from N(m, P^-1): (sum log diag P - log det P) / 2."""
    precision = model.posterior_precision()
    return float(0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)))


@pytest.fixture(scope="module")
def chain_gaps(chain):
    """Measured approximation gap of each fitted local family on the chain."""
    model, x = chain
    exact = model.log_marginal(x)
    out = {}
    for family in ("diag", "full", "flow"):
        guide = ppl_vae.fit_local(model, x, family, seed=0, progress=False)
        found = ppl_vae.diagnostics(model, guide, x, NUM_SAMPLES, seed=3)
        out[family] = guide, float((exact - found.elbo).mean()), mean_se(found.elbo_se)
        out[family + " log p(x) error"] = float((found.log_marginal - exact).mean())
        out[family + " log p(x) se"] = mean_se(found.log_marginal_se)
    return out


def test_chain_posterior_is_far_from_mean_field(chain):
    model, _ = chain
    assert chain_mean_field_gap(model) > 0.3  # so the tests below mean something


def test_local_guides_cover_both_sites_jointly(chain_gaps):
    guide, _, _ = chain_gaps["full"]
    assert isinstance(guide, LocalFull) and guide.space.names == ("h1", "h2")
    assert guide.loc.shape == (200, 4) and guide.off_diag.shape == (200, 6)
    assert isinstance(chain_gaps["diag"][0], LocalDiag)
    assert isinstance(chain_gaps["flow"][0], LocalFlow)


def test_diag_gap_is_the_closed_form_mean_field_gap(chain, chain_gaps):
    model, _ = chain
    _, gap, se = chain_gaps["diag"]
    assert abs(gap - chain_mean_field_gap(model)) <= 3 * se + OPTIMIZATION_SLACK


def test_full_gap_is_zero(chain_gaps):
    _, gap, se = chain_gaps["full"]
    assert abs(gap) <= 3 * se + OPTIMIZATION_SLACK
    # q* is (nearly) the posterior: as a proposal it gives log p(x) with tiny variance.
    assert abs(chain_gaps["full log p(x) error"]) <= 3 * chain_gaps["full log p(x) se"]


def test_flow_gap_is_well_below_the_mean_field_gap(chain, chain_gaps):
    model, _ = chain
    _, gap, se = chain_gaps["flow"]
    assert -3 * se <= gap < 0.1 * chain_mean_field_gap(model)


def test_gaps_with_a_users_own_two_site_guide(chain):
    model, x = chain
    guide = ChainGuide(x.shape[1])
    ppl_vae.fit(model, guide, x, num_steps=1500, lr=2e-2, seed=0, progress=False,
                train_model=False)
    with pytest.raises(ValueError, match="local="):
        ppl_vae.gaps(model, guide, x, num_samples=10, progress=False)
    report = ppl_vae.gaps(model, guide, x, local="diag", num_samples=NUM_SAMPLES, seed=0,
                          progress=False)
    assert report.local_family == "diag" and report.log_px_method == "exact"
    # L[q*] of the local fit, over both sites, is the closed-form mean-field optimum...
    gap_se = mean_se(report.per_datapoint["approximation_gap_se"])
    assert abs(report.approximation_gap - chain_mean_field_gap(model)) <= (
        3 * gap_se + OPTIMIZATION_SLACK)
    # ...and the user's mean-field guide, a member of the same family, is no better.
    assert report.amortization_gap >= -3 * report.amortization_gap_se


# ------------------------------------------------------------------ positive latent


class GammaPoisson(PyroModule):
    """rate ~ Gamma(2, 1), a positive scalar per datapoint; x_d ~ Poisson(rate e_d)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("exposure", torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64))
        self.register_buffer("shape", torch.tensor(2.0, dtype=torch.float64))
        self.data_dim = 4

    def prior(self):
        return dist.Gamma(self.shape, torch.ones_like(self.shape))

    def forward(self, x=None, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            rate = pyro.sample("rate", self.prior())
            return pyro.sample("x", dist.Poisson(rate[..., None] * self.exposure).to_event(1),
                               obs=x)

    def log_marginal_by_quadrature(self, x):
        """log p(x) = log integral p(x | e^t) p(e^t) e^t dt on a fine grid of t = log rate."""
        t = torch.linspace(-14.0, 6.0, 40001, dtype=torch.float64)
        rate = t.exp()
        log_joint = (self.prior().log_prob(rate) + t
                     + dist.Poisson(rate[:, None, None] * self.exposure).log_prob(x).sum(-1).T)
        return torch.logsumexp(log_joint, -1) + math.log(float(t[1] - t[0]))


@pytest.fixture(scope="module")
def gamma_poisson():
    model = GammaPoisson()
    pyro.set_rng_seed(2)
    with torch.no_grad():
        x = model(None, num_data=60)
    return model, x, model.log_marginal_by_quadrature(x)


@pytest.mark.parametrize("family", ["diag", "flow"])
def test_positive_latent_against_quadrature(gamma_poisson, family):
    model, x, exact = gamma_poisson
    guide = ppl_vae.fit_local(model, x, family, seed=0, progress=False)
    with torch.no_grad():
        rate = guide(x)["rate"]
    assert rate.shape == (60,) and (rate > 0).all()
    found = ppl_vae.diagnostics(model, guide, x, NUM_SAMPLES, seed=1)
    # L[q*] <= log p(x) for every datapoint...
    assert (found.elbo <= exact + 3 * found.elbo_se).all()
    assert float((exact - found.elbo).mean()) > 0
    # ...and importance sampling with q* as the proposal finds log p(x).
    assert abs(float((found.log_marginal - exact).mean())) <= 3 * mean_se(found.log_marginal_se)
    # A near-perfect proposal (k-hat is no guide here: the weights are almost constant).
    assert float(found.ess.min()) > 0.5 * NUM_SAMPLES


def test_guide_density_is_that_of_the_constrained_latent(gamma_poisson):
    # log q(rate) = log q(u) - log |d rate / d u|, u = log rate: the Delta site carries
    # the Jacobian, so the guide's total log-density is that of the positive latent.
    model, x, _ = gamma_poisson
    guide = LocalFlow.of(model, x)
    with torch.no_grad():
        for p in guide.parameters():
            p.normal_(0, 0.3)
        trace = pyro.poutine.trace(guide).get_trace(x)
        u = trace.nodes["_local_latent"]["value"]
        expected = guide.joint_distribution(x).log_prob(u.clone()) - u[..., 0]
        trace.compute_log_prob()
        total = sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")
    torch.testing.assert_close(trace.nodes["rate"]["value"], u[..., 0].exp())
    torch.testing.assert_close(total, expected)


# ------------------------------------------------------------- latent of shape (2, 3)


class MatrixLatent(PyroModule):
    """z ~ N(0, I) of event shape (2, 3); x ~ N(W vec(z), s^2 I_4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.register_buffer("W", torch.randn(4, 6, dtype=torch.float64))
        self.s, self.data_dim = 0.5, 4

    def forward(self, x=None, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(self.W.new_zeros(2, 3), 1.0).to_event(2))
            loc = z.reshape(*z.shape[:-2], 6) @ self.W.T
            return pyro.sample("x", dist.Normal(loc, self.s).to_event(1), obs=x)

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(4, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(torch.zeros(4, dtype=x.dtype), cov
                                                      ).log_prob(x)


def test_latent_of_event_shape_2_by_3():
    model = MatrixLatent()
    pyro.set_rng_seed(5)
    with torch.no_grad():
        x = model(None, num_data=50)
    guide = ppl_vae.fit_local(model, x, "full", seed=0, progress=False)
    assert guide.latent_dim == 6
    with torch.no_grad():
        assert guide(x)["z"].shape == (50, 2, 3)
    found = ppl_vae.diagnostics(model, guide, x, NUM_SAMPLES, seed=1)
    gap = float((model.log_marginal(x) - found.elbo).mean())
    assert abs(gap) <= 3 * mean_se(found.elbo_se) + OPTIMIZATION_SLACK


# ------------------------------------------------------------------ curved posterior


class Banana(PyroModule):
    """z ~ N(0, I_2), x ~ N(z_2 + z_1^2, s^2): p(z | x) bends along z_2 = x - z_1^2.

    For x < (1 + s^2) / 2 the posterior is unimodal, and x | z_1 ~ N(z_1^2, 1 + s^2)
    gives log p(x) by 1-D quadrature over z_1.
    """

    def __init__(self, s=0.3):
        super().__init__()
        self.register_buffer("zero", torch.zeros(2, dtype=torch.float64))
        self.s, self.data_dim = s, 1

    def forward(self, x=None, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(self.zero, 1.0).to_event(1))
            loc = (z[..., 1] + z[..., 0] ** 2)[..., None]
            return pyro.sample("x", dist.Normal(loc, self.s).to_event(1), obs=x)

    def log_marginal_by_quadrature(self, x):
        z1 = torch.linspace(-8.0, 8.0, 40001, dtype=torch.float64)
        scale = math.sqrt(1 + self.s**2)
        log_joint = (dist.Normal(0.0, 1.0).log_prob(z1)
                     + dist.Normal(z1**2, scale).log_prob(x))  # x (N, 1) against the grid
        return torch.logsumexp(log_joint, -1) + math.log(float(z1[1] - z1[0]))


def test_flow_beats_diag_on_a_curved_posterior():
    model = Banana()
    x = torch.tensor([[-1.0], [-0.5], [0.0], [0.3]], dtype=torch.float64).repeat(4, 1)
    exact = model.log_marginal_by_quadrature(x)
    gaps = {}
    for family in ("diag", "flow"):
        guide = ppl_vae.fit_local(model, x, family, seed=0, progress=False)
        found = ppl_vae.diagnostics(model, guide, x, NUM_SAMPLES, seed=1)
        gap, se = float((exact - found.elbo).mean()), mean_se(found.elbo_se)
        assert gap >= -3 * se  # both are lower bounds
        gaps[family] = gap, se
        if family == "flow":
            # As a proposal, its log p(x) is far closer than its ELBO (not within the
            # delta-method se: k-hat reaches ~1, the flow's tails are still too light).
            error = float((found.log_marginal - exact).mean())
            assert -0.25 * gap < error <= 3 * mean_se(found.log_marginal_se)
    (diag_gap, diag_se), (flow_gap, flow_se) = gaps["diag"], gaps["flow"]
    assert diag_gap > 0.2  # the curvature costs a Gaussian this much (measured 0.39)
    assert flow_gap < 0.5 * diag_gap - 3 * math.hypot(diag_se, flow_se)


# ------------------------------------------------------------------------ bad input


def test_unknown_family_is_refused(chain):
    model, x = chain
    with pytest.raises(ValueError, match="family must be one of"):
        ppl_vae.fit_local(model, x, "iaf", progress=False)
    with pytest.raises(ValueError, match="local must be one of"):
        ppl_vae.gaps(model, ChainGuide(5), x, local="iaf", progress=False)


def test_family_mismatch_without_match_family_is_refused(chain):
    model, x = chain

    class Flowish(ChainGuide):
        family = "flow"

    with pytest.raises(ValueError, match="family 'flow'"):
        ppl_vae.gaps(model, Flowish(5), x, local="diag", progress=False)
    with pytest.raises(ValueError, match="no local counterpart"):
        Unknown = type("Unknown", (ChainGuide,), {"family": "mixture"})
        ppl_vae.gaps(model, Unknown(5), x, progress=False)


def test_flow_encoder_family_pairs_with_the_flow_local_guide():
    torch.manual_seed(0)
    model = VAE(12, 2, hidden=(8,))
    encoder = FlowEncoder(12, 2, hidden=(8,), flow_hidden=(8,))
    x = (torch.rand(20, 12) < 0.3).float()
    with pytest.raises(ValueError, match="family 'flow'"):
        ppl_vae.gaps(model, encoder, x, local="diag", progress=False)
    with pytest.warns(UserWarning, match="k-hat"):  # 20 samples of an untrained VAE
        report = ppl_vae.gaps(model, encoder, x, num_samples=20, local_steps=5,
                              progress=False)
        assert report.local_family == "flow"
        report = ppl_vae.gaps(model, MLPEncoder(12, 2, hidden=(8,)), x, local="flow",
                              match_family=False, num_samples=20, local_steps=5,
                              progress=False)
        assert report.local_family == "flow"


# ---------------------------------------------- the IWAE objective on these models


def iwae_bounds(model, guide, x, k, seeds=range(6)):
    """The IWAE-k bound per datapoint on a minibatch of every 3rd row, over seeds."""
    from ppl_vae.objectives import IWAE
    from ppl_vae.settings import module_local

    idx = torch.arange(0, len(x), 3)

    @module_local  # (it readies modules passed as arguments for local parameters)
    def bound(model, guide, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            loss = IWAE(k)(model, guide)(x[idx], idx=idx, num_data=len(x))
        return -float(loss) / len(x)

    values = torch.tensor([bound(model, guide, s) for s in seeds], dtype=torch.float64)
    return idx, float(values.mean()), float(values.std() / math.sqrt(len(values)))


def test_iwae_on_two_sites_and_a_positive_latent_rises_to_the_exact_value(chain,
                                                                          gamma_poisson):
    # Two sites with other names (a user's own guide), and a Gamma latent through a
    # local guide's auxiliary site and biject_to: the bound must reach log p(x).
    model, x = chain
    guide = ChainGuide(model.data_dim)
    ppl_vae.fit(model, guide, x, num_steps=500, lr=0.05, train_model=False, seed=0,
                progress=False)
    cases = [(model, guide, x, model.log_marginal(x))]
    gp, x_gp, exact_gp = gamma_poisson
    cases.append((gp, ppl_vae.fit_local(gp, x_gp, "diag", seed=0, progress=False), x_gp,
                  exact_gp))
    for model, guide, x, exact in cases:
        idx, one, se_one = iwae_bounds(model, guide, x, 1)
        _, many, se = iwae_bounds(model, guide, x, 2000)
        target = float(exact[idx].mean())
        assert one < many + 4 * math.hypot(se, se_one)
        assert many <= target + 4 * se + 1e-3
        assert target - many < 4 * se + 0.05
