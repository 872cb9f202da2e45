"""Groups of row blocks run as one call (ppl_vae.block_noise): same numbers, right draws."""

import math

import pyro
import pyro.distributions as dist
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.nn import PyroModule
from torch.distributions.transforms import AffineTransform

import ppl_vae
from ppl_vae import seeding
from ppl_vae.block_noise import MAX_GROUP, group_size, groups
from ppl_vae.estimators import Job
from ppl_vae.guides import ExactPosterior, LinearEncoder
from ppl_vae.models import PPCA
from ppl_vae.seeding import blocks


def _ppca(n=100, seed=0):
    torch.manual_seed(seed)
    model = PPCA(2, 1)
    with torch.no_grad():
        model.W.copy_(torch.tensor([[1.5], [-0.7]]))
        model.mu.copy_(torch.tensor([0.3, -0.2]))
    x = torch.randn(n, 1) @ model.W.detach().T + model.mu.detach() + 0.8 * torch.randn(n, 2)
    return model, x


def test_narrow_data_runs_in_groups_and_wide_data_does_not():
    assert group_size(2, 300) == 16 and group_size(784, 256) == 1
    assert group_size(1, 1) == MAX_GROUP
    model, x = _ppca()
    job = Job.checked(model, LinearEncoder(2, 1), x, 300, seed=0)
    assert [len(group.members) for group in job.my_groups] == [16]


def test_grouped_estimates_do_not_depend_on_how_rows_are_cut():
    model, x = _ppca()
    guide = LinearEncoder(2, 1)
    whole = ppl_vae.log_weights(model, guide, x, 300, seed=4)
    cut = [ppl_vae.log_weights(model, guide, x[a:b], 300, idx=torch.arange(a, b),
                               num_data=len(x), seed=4) for a, b in ((0, 37), (37, 40), (40, 100))]
    assert torch.equal(whole, torch.cat(cut, dim=1))
    # An index twice in one call: both copies get the draws of that row.
    twice = ppl_vae.log_weights(model, guide, x[[5, 5, 70]], 300, idx=torch.tensor([5, 5, 70]),
                                num_data=len(x), seed=4)
    assert torch.equal(twice, whole[:, [5, 5, 70]])


def test_grouped_draws_follow_the_proposal():
    """IS with the guide at the prior: log p(x) within 4 SE of the closed form."""
    model, x = _ppca(n=60, seed=1)
    guide = LinearEncoder(2, 1)
    d = ppl_vae.diagnostics(model, guide, x, 2000, seed=0)
    exact = model.score_samples(x)
    err = (d.log_marginal - exact).mean()
    se = d.log_marginal_se.square().sum().sqrt() / len(x)
    assert abs(float(err)) < 4 * float(se) + 2e-3


class _WidePosterior(PyroModule):
    """The exact posterior of a 1-latent PPCA, shifted by half its sd and twice as wide,
    as a MultivariateNormal or as a standard normal pushed through an affine map (a
    TransformedDistribution): both families whose draws BlockNoise makes itself."""

    def __init__(self, model, family):
        super().__init__()
        self.model, self.family = model, family

    def moments(self, x):
        post = self.model.posterior(x)
        sd = post.scale_tril[..., 0]
        return post.loc + 0.5 * sd, 2 * sd

    def forward(self, x, idx=None, num_data=None):
        loc, scale = self.moments(x)
        if self.family == "mvn":
            q = dist.MultivariateNormal(loc, scale_tril=scale.unsqueeze(-1))
        else:
            base = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
            q = dist.TransformedDistribution(base, [AffineTransform(loc, scale, event_dim=1)])
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            pyro.sample("z", q)


def test_grouped_draws_of_gaussian_families_give_the_closed_form_elbo():
    """ELBO = log p(x) - KL(q || p(z | x)), in closed form for a Gaussian q: only draws
    from q itself average to it (the exact posterior would not tell: its weights are
    constant at any z)."""
    model, x = _ppca(n=50, seed=2)
    post = model.posterior(x)
    mean, sd = post.loc[:, 0], post.scale_tril[:, 0, 0]
    for family in ("mvn", "affine"):
        guide = _WidePosterior(model, family)
        assert len(Job.checked(model, guide, x, 256, seed=0).my_groups[0].members) > 1
        loc, scale = (t[:, 0] for t in guide.moments(x))
        kl = torch.log(sd / scale) + (scale**2 + (loc - mean) ** 2) / (2 * sd**2) - 0.5
        d = ppl_vae.diagnostics(model, guide, x, 256, seed=0)
        err = float((d.elbo - (model.score_samples(x) - kl)).mean())
        se = float(d.elbo_se.square().sum().sqrt()) / len(x)
        assert abs(err) < 4 * se, (family, err, se)


def test_exact_posterior_in_groups_gives_log_px_with_no_variance():
    model, x = _ppca(n=50, seed=2)
    lw = ppl_vae.log_weights(model, ExactPosterior(model), x, 64, seed=0)
    assert float((lw - model.score_samples(x)).abs().max()) < 1e-4


class _LaplaceGuide(PyroModule):
    def forward(self, x, idx=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            pyro.sample("z", dist.Laplace(torch.zeros(len(x), 1), 1.0).to_event(1))


def test_a_proposal_with_other_draws_runs_block_by_block():
    model, x = _ppca(n=40)
    job = Job.checked(model, _LaplaceGuide(), x, 300, seed=0)
    assert {len(group.members) for group in job.my_groups} == {1}
    lp = ppl_vae.log_marginal(model, _LaplaceGuide(), x, 300, seed=0)
    assert torch.isfinite(lp).all() and math.isfinite(float(lp.mean()))


def test_groups_pad_missing_blocks_and_keep_block_numbers():
    idx = torch.tensor([0, 1, 40, 41, 17])  # blocks 0, 2 and 1
    found = groups(list(blocks(idx)), 2)
    assert [g.number for g in found] == [0, 1]
    first, second = found
    assert [b.number if b else None for b in first.members] == [0, 1]
    assert [b.number if b else None for b in second.members] == [2, None]
    assert len(second.rows()) == 32 and int(second.real().sum()) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=60, unique=True))
def test_blocks_of_distinct_indices_are_built_as_one_by_one(indices):
    idx = torch.tensor(indices)
    order = torch.argsort(idx, stable=True)
    expected = list(seeding._blocks_in_layers(order, idx[order]))
    found = list(blocks(idx))
    assert [b.number for b in found] == [b.number for b in expected]
    for got, want in zip(found, expected, strict=True):
        for name in ("rows", "real", "positions"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
