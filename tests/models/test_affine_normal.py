"""AffineNormal: Normal(z W^T + b, scale) whose log density skips forming the mean."""

from __future__ import annotations

import copy
import functools
import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA, FactorAnalysis, affine_normal, distributions, linear_gaussian
from ppl_vae.models.affine_normal import AffineNormal
from ppl_vae.models.distributions import Normal

EPS32 = torch.finfo(torch.float32).eps


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _exact_and_bound(z, weight, bias, scale, value):
    """log N(value; z W^T + b, scale) summed over the last dim, in float64, and a bound on
    a float32 result's error: a few roundings of the largest terms each value adds."""
    z, weight, bias, scale, value = (t.double() for t in (z, weight, bias, scale, value))
    inverse = 1 / (scale * math.sqrt(2))
    centred, fitted = (value - bias) * inverse, (z @ weight.T) * inverse
    terms = -(centred - fitted) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)
    size = ((centred.abs() + fitted.abs()) ** 2 + terms.abs()).expand(terms.shape)
    return terms.sum(-1), 16 * EPS32 * size.sum(-1) + 1e-6


def _fused_path_taken(monkeypatch, whole_array=True) -> list:
    """Count the calls of the fused formula (and, with ``whole_array=False``, let the
    event sum cut its array into chunks as it would any other formula's)."""
    calls = []
    original = affine_normal._affine_normal_log_density
    # (wraps keeps the formula's marks: values laid out event dim first, whole array)
    counted = functools.wraps(original)(lambda *a: calls.append(1) or original(*a))
    if not whole_array:
        del counted.whole_array
    monkeypatch.setattr(affine_normal, "_affine_normal_log_density", counted)
    return calls


@settings(max_examples=80, deadline=None)
@given(particles=st.integers(1, 40), rows=st.integers(1, 30), latents=st.integers(1, 5),
       width=st.integers(1, 20), per_dim_scale=st.booleans(), far=st.booleans(),
       full_value=st.booleans())
def test_the_log_density_without_autograd_is_the_float64_normal(
        particles, rows, latents, width, per_dim_scale, far, full_value):
    z = _randn(particles, rows, latents, seed=1)
    weight, bias = _randn(width, latents, seed=2), _randn(width, seed=3)
    scale = _randn(width if per_dim_scale else 1, seed=4).abs() + 0.1
    value = _randn(*((particles,) if full_value else ()), rows, width, seed=5)
    if far:  # data and mean far from zero, noise small: the residual must not suffer
        bias, value, scale = bias + 1e4, value * 0.01 + 1e4, scale * 0.01
    exact, bound = _exact_and_bound(z, weight, bias, scale, value)
    with torch.no_grad(), pyro.validation_enabled(False):
        got = AffineNormal(z, weight, bias, scale).to_event(1).log_prob(value)
    assert got.shape == exact.shape
    assert ((got.double() - exact).abs() <= bound).all(), float((got.double() - exact).abs().max())


def test_a_ppca_sized_batch_takes_the_fused_formula_and_matches_the_materialized_mean(
        monkeypatch):
    z, weight, bias = _randn(1000, 64, 2, seed=6), _randn(13, 2, seed=7), _randn(13, seed=8)
    scale, value = _randn(13, seed=9).abs() + 0.2, _randn(64, 13, seed=10)
    calls = _fused_path_taken(monkeypatch)
    with torch.no_grad(), pyro.validation_enabled(False):
        got = AffineNormal(z, weight, bias, scale).to_event(1).log_prob(value)
        materialized = Normal(F.linear(z, weight, bias), scale).to_event(1).log_prob(value)
    assert len(calls) == 1  # on the whole array: it makes no temporary of its size
    exact, bound = _exact_and_bound(z, weight, bias, scale, value)
    assert ((got.double() - exact).abs() <= bound).all()
    torch.testing.assert_close(got, materialized, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("rows", "step", "full_value"),
                         [(20, 7, False), (20, 7, True), (1, 1, False), (1, 7, False)])
def test_chunks_change_no_number(monkeypatch, rows, step, full_value):
    # The formula runs on the whole array; cut like any other into 300 particles' chunks
    # of `step` (the last one shorter), each row's sum is still taken slice by slice,
    # even in chunks of a single value per slice.
    z, weight, bias = _randn(300, rows, 3, seed=11), _randn(7, 3, seed=12), _randn(7, seed=13)
    scale = _randn(7, seed=14).abs() + 0.2
    value = _randn(*((300,) if full_value else ()), rows, 7, seed=15)
    calls = _fused_path_taken(monkeypatch, whole_array=False)
    with torch.no_grad(), pyro.validation_enabled(False):
        whole = AffineNormal(z, weight, bias, scale).to_event(1).log_prob(value)
        monkeypatch.setattr(distributions, "CHUNK_VALUES", 7 * rows * step)
        chunked = AffineNormal(z, weight, bias, scale).to_event(1).log_prob(value)
    assert len(calls) == 1 + math.ceil(300 / step)
    assert torch.equal(whole, chunked)


def test_with_autograd_it_is_the_library_normal_of_the_linear_mean_to_the_bit():
    z = _randn(5, 8, 2, seed=16).requires_grad_()
    weight = _randn(6, 2, seed=17).requires_grad_()
    bias, scale = _randn(6, seed=18).requires_grad_(), (_randn(6, seed=19).abs() + 0.3)
    scale.requires_grad_()
    value = _randn(8, 6, seed=20)
    params = (z, weight, bias, scale)
    got = AffineNormal(*params).to_event(1).log_prob(value).sum()
    expected = Normal(F.linear(z, weight, bias), scale).to_event(1).log_prob(value).sum()
    assert torch.equal(got, expected)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(expected, params),
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["one scale per row", "float64 scale"])
def test_other_scales_and_dtypes_give_the_normal_of_the_formed_mean(monkeypatch, case):
    # Three rows of three dims: a scale per row has as many values as one per dim.
    z, weight, bias = _randn(4, 3, 2, seed=33), _randn(3, 2, seed=34), _randn(3, seed=35)
    scale, value = _randn(3, 1, seed=36).abs() + 0.2, _randn(3, 3, seed=37)
    if case == "float64 scale":
        scale = scale.reshape(3).double()
    calls = _fused_path_taken(monkeypatch)
    with torch.no_grad(), pyro.validation_enabled(False):
        got = AffineNormal(z, weight, bias, scale).to_event(1).log_prob(value)
        expected = Normal(F.linear(z, weight, bias), scale).to_event(1).log_prob(value)
    assert not calls
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_a_bias_of_another_dtype_is_refused_as_f_linear_refuses_it():
    z, weight, bias = _randn(4, 3, 2, seed=38), _randn(3, 2, seed=39), _randn(3, seed=40)
    with torch.no_grad(), pyro.validation_enabled(False), pytest.raises(RuntimeError):
        AffineNormal(z, weight, bias.double(), torch.ones(3)).to_event(1).log_prob(
            torch.zeros(4, 3, 3))


def test_a_scale_of_the_full_shape_uses_the_materialized_mean(monkeypatch):
    z, weight, bias = _randn(4, 5, 2, seed=21), _randn(3, 2, seed=22), _randn(3, seed=23)
    scale, value = _randn(4, 5, 3, seed=24).abs() + 0.2, _randn(5, 3, seed=25)
    calls = _fused_path_taken(monkeypatch)
    with torch.no_grad(), pyro.validation_enabled(False):
        got = AffineNormal(z, weight, bias, scale).to_event(1).log_prob(value)
        expected = Normal(F.linear(z, weight, bias), scale).to_event(1).log_prob(value)
    assert not calls
    assert torch.equal(got, expected)


def test_mean_sampling_and_expand_behave_as_the_normal_of_the_mean():
    z, weight, bias = _randn(5, 2, seed=26), _randn(3, 2, seed=27), _randn(3, seed=28)
    scale = torch.full((3,), 0.5)
    d = AffineNormal(z, weight, bias, scale)
    assert d.batch_shape == (5, 3)
    torch.testing.assert_close(d.mean, F.linear(z, weight, bias))
    torch.testing.assert_close(d.variance, torch.full((5, 3), 0.25))
    assert d.sample((7,)).shape == (7, 5, 3)
    assert d.expand((5, 3)) is d
    wider = d.expand((4, 5, 3))
    assert isinstance(wider, AffineNormal) and wider.batch_shape == (4, 5, 3)
    torch.testing.assert_close(wider.mean, F.linear(z, weight, bias).expand(4, 5, 3))
    with pytest.raises(RuntimeError):
        d.expand((5, 4))  # torch's own refusal, from the formed mean


def test_a_mean_read_without_autograd_is_formed_again_when_a_gradient_is_wanted():
    weight = _randn(3, 2, seed=29).requires_grad_()
    with torch.no_grad():  # (with autograd on, the mean is formed at once, with its graph)
        d = AffineNormal(_randn(4, 2, seed=30), weight, torch.zeros(3), torch.ones(3),
                         validate_args=False)  # validation reads the mean at once
        assert not d.loc.requires_grad
    d.log_prob(torch.zeros(4, 3)).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model_class", [PPCA, FactorAnalysis])
def test_a_fit_is_equal_to_the_bit_to_one_with_the_formed_mean(monkeypatch, model_class):
    # 120 steps: past the step from which fit records its loss and gradients as one graph.
    x = _randn(300, 6, seed=31) @ _randn(6, 6, seed=32)
    model, guide = model_class(6, 2), LinearEncoder(6, 2)
    fits = []
    for likelihood in (AffineNormal, lambda z, w, b, s: Normal(F.linear(z, w, b), s)):
        monkeypatch.setattr(linear_gaussian, "AffineNormal", likelihood)
        m, g = copy.deepcopy(model), copy.deepcopy(guide)
        result = ppl_vae.fit(m, g, x, num_steps=120, batch_size=64, lr=1e-2, progress=False,
                             seed=0)
        fits.append((result.history, [p.detach() for p in (*m.parameters(), *g.parameters())]))
    (history, params), (formed_history, formed_params) = fits
    assert (history == formed_history).all()
    assert all(torch.equal(a, b) for a, b in zip(params, formed_params, strict=True))
