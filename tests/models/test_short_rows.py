"""The long-row forms of elementwise ops give the plain ops' numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl_vae.models import short_rows


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(leading=st.lists(st.integers(1, 70), min_size=0, max_size=3),
       trailing=st.lists(st.integers(1, 20), min_size=0, max_size=2),
       ones=st.integers(0, 2), subtract=st.booleans())
def test_an_in_place_op_through_wide_rows_is_the_broadcast_op(leading, trailing, ones,
                                                             subtract):
    # The operand spans the trailing dims (after `ones` leading dims of size 1).
    t = _randn(*leading, *trailing, seed=9)
    operand = _randn(*([1] * ones), *trailing, seed=10) + 2.0
    op = torch.Tensor.sub_ if subtract else torch.Tensor.mul_
    expected = op(t.clone(), operand) if operand.dim() <= t.dim() else None
    if expected is None:  # an operand with more dims than t cannot work in place
        return
    old = short_rows._WIDE_FROM
    short_rows._WIDE_FROM = 1  # the wide views for arrays of any size
    try:
        got = short_rows.in_place(op, t.clone(), operand)
    finally:
        short_rows._WIDE_FROM = old
    assert torch.equal(got, expected)




@settings(max_examples=60, deadline=None)
@given(leading=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       latents=st.integers(1, 6), width=st.integers(1, 80))
def test_affine_without_autograd_is_the_fused_linear(leading, latents, width):
    z = _randn(*leading, latents, seed=1)
    weight, bias = _randn(width, latents, seed=2), _randn(width, seed=3)
    with torch.no_grad():
        got, expected = short_rows.affine(z, weight, bias), F.linear(z, weight, bias)
    torch.testing.assert_close(got, expected)  # a rounding apart at most (one latent)


def test_affine_of_a_ppca_sized_batch_takes_the_long_rows_and_keeps_gradients():
    z, weight = _randn(1000, 64, 2, seed=4), _randn(13, 2, seed=5)
    bias = _randn(13, seed=6).requires_grad_()
    calls = []
    original = short_rows.in_place
    short_rows.in_place = lambda *args: calls.append(args) or original(*args)
    try:
        with torch.no_grad():
            got = short_rows.affine(z, weight, bias)
    finally:
        short_rows.in_place = original
    assert len(calls) == 1
    torch.testing.assert_close(got, F.linear(z, weight, bias), rtol=0, atol=0)
    out = short_rows.affine(z, weight, bias)
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((13,), 64000.0))
