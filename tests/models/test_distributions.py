"""The models' lighter Normal and Bernoulli against torch's own densities."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributions as td

from ppl_vae.models.distributions import (
    Bernoulli,
    Normal,
    StandardNormal,
    binary_check_may_be_frozen,
    standard_normal,
)


@pytest.mark.parametrize("loc_shape, scale_shape, value_shape", [
    ((5,), (5,), (3, 4, 5)),        # a noise scale per data dimension, broadcast
    ((4, 5), (), (3, 4, 5)),        # one scalar scale
    ((3, 4, 5), (4, 1), (3, 4, 5)),  # a scale per row
])
def test_normal_log_prob_is_torchs_on_broadcast_scales(loc_shape, scale_shape, value_shape):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(loc_shape, generator=g, dtype=torch.float64)
    scale = torch.rand(scale_shape, generator=g, dtype=torch.float64) + 0.1
    value = torch.randn(value_shape, generator=g, dtype=torch.float64)
    ours = Normal(loc, scale).log_prob(value)
    theirs = td.Normal(loc, scale).log_prob(value)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_standard_normal_is_the_closed_form_and_stays_one_when_expanded():
    z = torch.linspace(-4, 4, 9, dtype=torch.float64).reshape(3, 3)
    prior = standard_normal(z, 3).expand((3,)).to_event(1)
    assert isinstance(prior.base_dist, StandardNormal)
    closed_form = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(prior.log_prob(z), closed_form, rtol=0, atol=1e-12)
    assert prior.base_dist.loc.dtype == torch.float64 and prior.event_shape == (3,)


@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3)])
def test_normal_draws_torchs_numbers_in_one_pass(sample_shape):
    loc, scale = torch.randn(5, 2), torch.rand(2) + 0.5
    torch.manual_seed(7)
    ours = Normal(loc, scale).rsample(sample_shape)
    torch.manual_seed(7)
    theirs = td.Normal(loc, scale).rsample(sample_shape)
    assert torch.equal(ours, theirs)
    traced = torch.jit.trace(lambda m, s: Normal(m, s).rsample(), (loc, scale))
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "aten::randn" in kinds and "aten::normal" not in kinds


def _logits_and_binary(shape=(6, 4, 7)):
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(shape, generator=g, dtype=torch.float64)
    x = (torch.rand(shape[1:], generator=g) < 0.4).double()
    return logits, x


def test_bernoulli_log_prob_is_torchs_for_binary_and_for_other_values():
    logits, x = _logits_and_binary()
    expected = td.Bernoulli(logits=logits).log_prob(x.expand_as(logits))
    torch.testing.assert_close(Bernoulli(logits=logits).log_prob(x), expected, rtol=0,
                               atol=1e-12)
    soft = torch.full_like(x, 0.3)  # not binary: the formula of the cross-entropy
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits, soft.expand_as(logits), reduction="none")
    dist = Bernoulli(logits=logits, validate_args=False)
    torch.testing.assert_close(dist.log_prob(soft), expected, rtol=0, atol=1e-12)


def _traced(fn, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(fn, inputs, check_trace=False)


def test_bernoulli_short_formula_keeps_float32_precision_and_gradient_at_extreme_logits():
    # exp(-|l|) underflows far from 0: the log density and its gradient must still be
    # float32-exact out to |logit| = 120, for x = 0 and x = 1.
    logits = torch.linspace(-120, 120, 24001).expand(2, 24001).clone().requires_grad_()
    x = torch.tensor([[0.0], [1.0]]).expand(2, 24001)
    ours = Bernoulli(logits=logits, validate_args=False).log_prob(x[:, :1].expand_as(x))
    # (torch's float64 cross-entropy is not the reference here: it cancels 33 - 33 at
    # logit -33 and is off by 4e-15 where the value is -3.6e-15)
    exact = torch.nn.functional.logsigmoid((2 * x.double() - 1) * logits.detach().double())
    error = (ours.detach().double() - exact).abs()
    assert error.max() < 1e-6
    representable = exact.abs() > 1e-30  # float32 holds no smaller log density
    assert (error / exact.abs())[representable].max() < 3e-7
    ours.sum().backward()
    exact_grad = x.double() - torch.sigmoid(logits.detach().double())
    assert (logits.grad.double() - exact_grad).abs().max() < 1e-6


def test_a_trace_whose_data_are_inputs_does_not_freeze_the_binary_check():
    # The SVI loss: traced on binary data, then called on other values, it must still
    # give the cross-entropy, not logsigmoid((2x - 1) l), which is wrong off {0, 1}.
    logits, x = _logits_and_binary()

    def log_prob(logits, value):
        return Bernoulli(logits=logits, validate_args=False).log_prob(value)

    traced = _traced(log_prob, logits, x)
    soft = torch.full_like(x, 0.3)
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits, soft.expand_as(logits), reduction="none")
    torch.testing.assert_close(traced(logits, soft), expected, rtol=0, atol=1e-12)


def test_a_trace_with_constant_binary_data_takes_the_short_formula_and_is_exact():
    logits, x = _logits_and_binary()

    def log_prob(logits):  # x is a constant of the trace, as in AIS's potential
        return Bernoulli(logits=logits).log_prob(x)

    with binary_check_may_be_frozen():
        traced = _traced(log_prob, logits)
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "aten::log_sigmoid" in kinds and "aten::binary_cross_entropy_with_logits" not in kinds
    other = logits.flip(0)
    expected = td.Bernoulli(logits=other).log_prob(x.expand_as(other))
    torch.testing.assert_close(traced(other), expected, rtol=0, atol=1e-12)
