"""The chunked, in-place event sums of the library's distributions against torch's own."""

from __future__ import annotations

import pyro
import pytest
import torch
import torch.distributions as td
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl_vae.models import distributions
from ppl_vae.models.distributions import Bernoulli, EventSum, Normal, standard_normal


def _binary(shape, seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.4).double()


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(autouse=True)
def no_validation():
    # As in the estimators: with validation on, log_prob validates and takes Pyro's path.
    with pyro.validation_enabled(False):
        yield


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 30 values: every call below is cut into several, with a remainder."""
    monkeypatch.setattr(distributions, "CHUNK_VALUES", 30)


def test_to_event_and_expand_keep_the_chunked_class():
    d = Normal(_randn(3, 4), 1.0).to_event(1)
    assert type(d) is EventSum
    assert type(d.expand((5, 3))) is EventSum
    assert type(Normal(_randn(3, 4, 2), 1.0).to_event(1).to_event(1)) is EventSum
    assert type(Bernoulli(logits=_randn(3, 4)).to_event(2)) is EventSum
    assert isinstance(Normal(_randn(4), 1.0).to_event(0), Normal)


@pytest.mark.parametrize("loc_shape, scale_shape, value_shape", [
    ((7, 4, 5), (5,), (4, 5)),        # particles x rows x D, the data broadcast
    ((4, 5), (), (7, 4, 5)),          # the value larger than the parameters
    ((7, 4, 5), (7, 1, 1), (7, 4, 5)),  # a scale per particle
    ((4, 5), (7, 4, 5), (4, 5)),      # the scale alone spans every dim
])
def test_normal_event_sum_without_autograd_is_torchs(small_chunks, loc_shape, scale_shape,
                                                     value_shape):
    loc, value = _randn(*loc_shape, seed=1), _randn(*value_shape, seed=2)
    scale = torch.rand(scale_shape, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64) + 0.2
    batch = torch.broadcast_shapes(loc_shape, scale_shape, value_shape)[:-1]
    ours = Normal(loc, scale).to_event(1).expand(batch)
    inputs = [t.clone() for t in (loc, scale, value)]
    with torch.no_grad():
        chunked = ours.log_prob(value)
    expected = td.Independent(td.Normal(loc, scale), 1).log_prob(value)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked, ours.log_prob(value), rtol=0, atol=1e-12)  # autograd
    # The formula works in place on its own temporaries, never on its inputs.
    assert all(torch.equal(a, b) for a, b in zip(inputs, (loc, scale, value), strict=True))


def test_standard_normal_and_bernoulli_event_sums_are_torchs(small_chunks):
    z = _randn(9, 4, 3, seed=4)
    prior = standard_normal(z, 3).expand((9, 4, 3)).to_event(1)
    with torch.no_grad():
        torch.testing.assert_close(prior.log_prob(z),
                                   td.Independent(td.Normal(0.0, 1.0).expand((9, 4, 3)),
                                                  1).log_prob(z), rtol=0, atol=1e-12)
    logits, x = 4 * _randn(9, 4, 6, seed=5), _binary((4, 6))
    likelihood = Bernoulli(logits=logits).to_event(1)
    expected = td.Independent(td.Bernoulli(logits=logits), 1).log_prob(x.expand(9, 4, 6))
    with torch.no_grad():
        torch.testing.assert_close(likelihood.log_prob(x), expected, rtol=0, atol=1e-12)
        soft = torch.full((4, 6), 0.3, dtype=torch.float64)  # not binary: Pyro's formula
        bce = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, soft.expand(9, 4, 6), reduction="none").sum(-1)
        got = Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(soft)
        torch.testing.assert_close(got, bce, rtol=0, atol=1e-12)


def test_the_formula_sees_chunks_of_at_most_chunk_values(small_chunks, monkeypatch):
    sizes, rows = [], distributions._rows

    def recorded(t, ndim, start, length):
        part = rows(t, ndim, start, length)
        sizes.append(part.numel())
        return part

    monkeypatch.setattr(distributions, "_rows", recorded)
    loc = _randn(11, 2, 5)  # 10 values a particle: chunks of 3 particles, then 2
    with torch.no_grad():
        Normal(loc, 1.0).to_event(1).log_prob(_randn(2, 5))
    assert max(sizes) <= 30 and len(sizes) > 4


def test_with_autograd_the_gradient_is_the_plain_one():
    loc = _randn(6, 3, 4).requires_grad_()
    value = _randn(3, 4, seed=1)
    Normal(loc, 0.5).to_event(1).log_prob(value).sum().backward()
    torch.testing.assert_close(loc.grad, ((value - loc) / 0.25).detach().expand(6, 3, 4))


@settings(max_examples=40, deadline=None)
@given(particles=st.integers(1, 9), rows=st.integers(1, 4), width=st.integers(1, 10),
       per_dim_scale=st.booleans(), chunk=st.integers(1, 40))
def test_any_chunking_gives_the_unchunked_numbers(particles, rows, width, per_dim_scale,
                                                  chunk):
    loc, value = _randn(particles, rows, width, seed=6), _randn(rows, width, seed=7)
    scale = torch.rand(width if per_dim_scale else (), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(8)) + 0.3
    d = Normal(loc, scale).to_event(1)
    old = distributions.CHUNK_VALUES
    try:
        with torch.no_grad():
            distributions.CHUNK_VALUES = 10**9
            expected = d.log_prob(value)
            distributions.CHUNK_VALUES = chunk
            got = d.log_prob(value)
    finally:
        distributions.CHUNK_VALUES = old
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, d.log_prob(value), rtol=0, atol=1e-12)  # autograd on


@pytest.mark.parametrize("shape", [(5, 3, 2), (7, 6), (4, 1), (3, 4, 7), (2, 3, 40)])
def test_event_sums_of_short_and_long_event_dims_are_torchs(shape):
    values = _randn(*shape, seed=11)
    torch.testing.assert_close(distributions._event_sum(values, (-1,)), values.sum(-1),
                               rtol=0, atol=1e-12)
    two = distributions._event_sum(values, (-2, -1)) if values.dim() > 2 else None
    if two is not None:
        torch.testing.assert_close(two, values.sum((-2, -1)), rtol=0, atol=1e-12)
    if shape[-1] <= distributions._SLICED_SUM_MAX:  # summed slice by slice, left to right
        expected = values[..., 0].clone()
        for j in range(1, shape[-1]):
            expected = expected + values[..., j]
        assert torch.equal(distributions._event_sum(values, (-1,)), expected)
