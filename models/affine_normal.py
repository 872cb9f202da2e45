"""``Normal(z W^T + b, scale)`` whose log density never forms its mean without autograd.

The linear-Gaussian models' likelihood is evaluated on (particles, rows, D) arrays. With
its mean formed first, as ``Normal(F.linear(z, W, b), scale)``, a log density costs six
passes over those values: the product, the bias, the residual, the scale, the square and
the sum. When the scale has one value per data dim (or one in all), the scaled residual
is

    (x - b) / s - z (W / s)^T,

where (x - b) / s has the data's shape (rows, D) and W / s is D x k: the product of the
latents with the scaled loadings, one subtraction, the square and the sum remain. The
product is laid out data dims first, so that the sum over them adds whole contiguous
slices (torch's reduction over rows of 13 values is three times slower per value). At
a PPCA's 1000 x 64 x 13 values the log density took 0.64 ms against 1.40 ms.

The numbers are within a few roundings of the other order, and no worse: ``x - b`` is
taken before anything is added to ``b``, so data far from zero lose nothing to it. Each
order is deterministic and independent of the chunks and of the array a row is part of.

With autograd, within a trace, or for a scale of another shape, the mean is formed (on
construction where autograd records, on first use otherwise, through
:func:`~ppl_vae.models.short_rows.affine`) and the log density is the library
:class:`~ppl_vae.models.distributions.Normal`'s: a log density, its gradients and a whole
``fit`` are equal to the bit to those of ``Normal(F.linear(z, W, b), scale)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppl_vae.models.distributions import (
    _HALF_LOG_2PI,
    Normal,
    broadcast_shape,
    event_dim_first,
    unbroadcast,
    whole_array,
)
from ppl_vae.models.short_rows import affine


class AffineNormal(Normal):
    """``Normal(F.linear(z, weight, bias), scale)``, its mean formed only when read.

    Parameters
    ----------
    z : Tensor of shape (..., k)
    weight : Tensor of shape (D, k)
    bias : Tensor of shape (D,), or of a shape that broadcasts to the batch shape
    scale : Tensor of a shape that broadcasts to the batch shape (..., D)
    """

    # (torch.Tensor, not Tensor: the API reference resolves a class's signature without
    # the module's names.)
    def __init__(self, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 scale: torch.Tensor, validate_args=None):
        self.z, self.weight, self.bias = z, weight, bias
        loc_shape = broadcast_shape(z.shape[:-1] + weight.shape[:1], bias.shape)
        shape = broadcast_shape(loc_shape, scale.shape)
        self.scale = scale.expand(shape)
        self._loc = None
        torch.distributions.Distribution.__init__(self, shape, validate_args=validate_args)
        if torch.is_grad_enabled() or torch.jit.is_tracing():
            # Formed at once where a graph is recorded, as Normal(F.linear(z, W, b), scale)
            # forms it: a fit then records the same graph, to the bit (formed later, at
            # the log density, its loss drifted by an ulp within a few steps).
            self._loc = self._formed_loc()

    @property
    def loc(self) -> Tensor:
        # Formed again where a gradient is now wanted that the first one lacks.
        stale = (self._loc is not None and torch.is_grad_enabled()
                 and not self._loc.requires_grad
                 and any(t.requires_grad for t in (self.z, self.weight, self.bias)))
        if self._loc is None or stale:
            self._loc = self._formed_loc()
        return self._loc

    def _formed_loc(self) -> Tensor:
        loc = affine(self.z, self.weight, self.bias)
        return loc if loc.shape == self.batch_shape else loc.expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None) -> Normal:
        # Pyro's plates expand every site's distribution, mostly to the shape it has.
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        if batch_shape[-1:] == self.batch_shape[-1:]:
            z = self.z.expand(batch_shape[:-1] + self.z.shape[-1:])
            return AffineNormal(z, self.weight, self.bias, self.scale.expand(batch_shape),
                                validate_args=False)
        return Normal(self.loc, self.scale).expand(batch_shape)

    def elementwise_terms(self, value: Tensor):
        """(formula, operands) of the log density; see the module doc."""
        terms = self._fused_terms(value)
        return super().elementwise_terms(value) if terms is None else terms

    def _fused_terms(self, value: Tensor):
        scale, shape = unbroadcast(self.scale), self.batch_shape
        data_dim, batch = self.weight.shape[0], len(self.batch_shape) - 1
        # One scale per data dim, or one in all: any other shape (one per row, say) is
        # not a scaling of W's rows.
        per_dim = scale.numel() == scale.shape[-1] and scale.shape[-1] in (1, data_dim)
        dtypes = {t.dtype for t in (value, self.z, self.weight, self.bias, scale)}
        if (torch.is_grad_enabled() or torch.jit.is_tracing() or not per_dim
                or len(dtypes) > 1 or self.z.shape[:-1] + (data_dim,) != shape
                or broadcast_shape(value.shape, shape) != shape):
            return None
        inverse = scale.reciprocal().mul_(math.sqrt(0.5))
        value_scaled = (value - self.bias) * inverse
        value_scaled = value_scaled.reshape((1,) * (len(shape) - value_scaled.dim())
                                            + value_scaled.shape)
        if batch and value_scaled.shape[0] == 1:
            # The same data for every chunk (the particles): laid out data dims first,
            # as the formula reads them.
            value_scaled = value_scaled.movedim(-1, 0).contiguous().movedim(0, -1)
        # The product for the whole array, laid out data dims first (D, *batch) and
        # read as a (*batch, D) view: the chunks then take their slices of one product
        # whose shape is the call's, so they change no number (a matrix product's
        # rounding of a row depends on how many rows it is given).
        weight = self.weight * inverse.reshape(-1, 1)
        batch_shape = shape[:-1]
        product = torch.mm(weight, self.z.reshape(-1, self.z.shape[-1]).T)
        product = product.view(data_dim, *batch_shape).movedim(0, -1)
        log_norm_t = (scale.log() + _HALF_LOG_2PI).reshape(-1, *[1] * batch)
        # A leading 1: chunks cut an operand along its first dim unless it is 1.
        return _affine_normal_log_density, (value_scaled, product, log_norm_t.unsqueeze(0))


@whole_array
@event_dim_first
def _affine_normal_log_density(value_scaled: Tensor, product: Tensor,
                               log_norm_t: Tensor) -> Tensor:
    """-((x - b)/s - z (W/s)^T)^2 - log_norm, in the product's own array, which lies data
    dims first: the sum over the data dims is then a sum of whole contiguous slices,
    three times faster per value than over rows of 13 values."""
    out = product.movedim(-1, 0)
    torch.sub(value_scaled.movedim(-1, 0), out, out=out)
    torch.addcmul(-log_norm_t[0], out, out, value=-1, out=out)
    return product
