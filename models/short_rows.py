"""Elementwise work against an operand of a few values, done through long rows.

torch's CPU kernels broadcast an operand that spans only a few trailing dims (a scale
per data dim, 13 values against 1000 x 64 x 13 residuals) over rows so short that they
take about five times longer per value than over long rows. The same holds for the bias
copy that starts ``F.linear(z, W, b)``: for a PPCA of 13 dims it took 420 of its 585 us
at 64000 x 2 latents, the product itself 160.

The helpers here do the same work through views with rows of ``_WIDE_ROW`` values or
so: ``in_place`` gives the plain op's numbers, ``affine`` the fused op's to the bit with
two latents or more and within a rounding with one. The estimators use them when no
gradient is recorded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Operands of 2 to _SHORT_ROW values are applied through views with rows of about
# _WIDE_ROW values, on arrays of at least _WIDE_FROM values (see in_place). A single value
# broadcasts fast as it is, and so do operands of 128 values or more.
_SHORT_ROW = 64
_WIDE_ROW = 512
_WIDE_FROM = 2**14


def in_place(op, t: Tensor, operand: Tensor) -> Tensor:
    """``op(t, operand)`` in place, for a contiguous ``t`` and an ``operand`` that
    broadcasts to it.

    When the operand's values repeat along rows of ``t``, both are viewed with rows of
    ``_WIDE_ROW`` values or so (the operand repeated to fill one): the same op on the
    same pairs of values.
    """
    tail = operand.shape
    while len(tail) and tail[0] == 1:
        tail = tail[1:]
    inner = math.prod(tail)
    if (1 < inner <= _SHORT_ROW and t.numel() >= _WIDE_FROM and t.is_contiguous()
            and len(tail) <= t.dim() and t.shape[t.dim() - len(tail):] == tail):
        rows = t.numel() // inner
        repeats = math.gcd(rows, 1 << ((_WIDE_ROW // inner).bit_length() - 1))
        wide = operand.reshape(1, inner).expand(repeats, inner).reshape(-1)
        op(t.view(rows // repeats, repeats * inner), wide)
    else:
        op(t, operand)
    return t


def affine(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.linear(z, weight, bias)``. Without autograd (and outside a trace, which may
    later run with it), a bias of 2 to ``_SHORT_ROW`` values on a large output is added
    after the product, through long rows.

    Within a rounding of the fused op, which may fold the bias into its last
    multiply-add (it did for a single latent); equal to the bit on every shape measured
    with two latents or more.
    """
    if (torch.is_grad_enabled() or torch.jit.is_tracing()
            or not 1 < bias.numel() <= _SHORT_ROW
            or z.numel() // max(1, z.shape[-1]) * bias.numel() < _WIDE_FROM):
        return F.linear(z, weight, bias)
    return in_place(torch.Tensor.add_, F.linear(z, weight), bias)
