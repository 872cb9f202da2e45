"""Pyro's Normal and Bernoulli with a ``log_prob`` that does less work on broadcast inputs.

The models' likelihoods are evaluated on (particles, rows, D) arrays thousands of times
per estimate, and most of an estimate's time outside the matrix products goes there:

- ``Normal``: Pyro's broadcasts the scale to the full shape before taking its log and
  square, so a model with one noise scale per data dimension pays two passes over
  (K, B, D) values for what are D numbers (and a log over a broadcast view is several
  times slower than over a contiguous one). Here the log is taken on the scale's own
  values and broadcast afterwards.
- ``Bernoulli``: ``-binary_cross_entropy_with_logits`` takes about six passes over the
  logits; for binary values (the data of every Bernoulli model: the boundary refuses
  others) log p = logsigmoid(+-logits) takes two, and is as exact.

Both are drop-in subclasses (``expand``, sampling and supports are Pyro's), so every
estimator, AIS and SVI reuse them through the model as before.

Their ``to_event`` gives an :class:`EventSum`, Pyro's ``Independent`` whose log density,
when no gradient is recorded (the estimators), is summed over the event dims
``CHUNK_VALUES`` values at a time and in place. A VAE's 256 x 16 x 784 logits are 12.8
MB, and each elementwise step of the Bernoulli's log density made a temporary as large.
glibc hands blocks that large back to the system when they are freed and faults fresh
pages in for the next one: about 9000 page faults per seeded unit on the machines
measured, at about 2 us each, longer than the arithmetic. In chunks the temporaries are
1 MB: they come from the heap and go back to it. Chunking changes no number: each chunk
runs the same elementwise formula on the same values, and each row is summed over its own
event dims. With a gradient to record (SVI, HMC), or within a trace, the distribution is
Pyro's ``Independent`` as it was. Two marks on a formula change how it is summed: one
that makes no temporary of its values' size runs on the whole array (:func:`whole_array`),
and one whose values lie event dim first is summed slice by slice
(:func:`event_dim_first`); the linear-Gaussian likelihood's formula has both
(:mod:`ppl_vae.models.affine_normal`).

Without autograd the formulas also avoid three slow spots of torch's CPU kernels, which
took most of a small model's arithmetic (PPCA: 13 data dims, 2 latents):

- an operand broadcast over short rows (a scale of 13 values against 1000 x 64 x 13
  residuals) is applied through views with long rows
  (:func:`~ppl_vae.models.short_rows.in_place`);
- the Normal multiplies by the scale's reciprocal rather than dividing by the scale;
- a last event dim of at most ``_SLICED_SUM_MAX`` values is summed slice by slice.

So the two paths agree to a rounding or two, not to the bit; each is deterministic, and
independent of the chunks and of the array a row is part of.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor

from ppl_vae.models.short_rows import in_place

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# True while a trace is recorded whose calls all give the Bernoulli's binary check the
# same answer (set by the caller that records it): the check may then be frozen into it.
_CHECK_MAY_BE_FROZEN = contextvars.ContextVar("binary_check_may_be_frozen", default=False)


# True while torch.fx records a loss and its gradients (ppl_vae.joint_trace): values
# cannot be read in Python then, so the Bernoulli's check is either frozen or skipped.
_RECORDING = contextvars.ContextVar("recording_with_fx", default=False)


@contextlib.contextmanager
def recording_with_fx():
    """Within this context torch.fx records the code that runs (no value can be read)."""
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)


@contextlib.contextmanager
def binary_check_may_be_frozen():
    """Record ``torch.jit.trace`` within this context only when the Bernoulli's check
    that its observed values are binary gives the same answer at every call of the
    trace: the values are constants of the trace (AIS's potential, a function of the
    latents alone), or every batch the trace will see is binary (``fit`` on binary
    data). The short formula log p = logsigmoid((2x - 1) l) then goes into the trace."""
    token = _CHECK_MAY_BE_FROZEN.set(True)
    try:
        yield
    finally:
        _CHECK_MAY_BE_FROZEN.reset(token)


def broadcast_shape(*shapes: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes`` of the shapes, for shapes known to broadcast (ten times
    faster: torch's checks take longer than a small model's arithmetic)."""
    out = [1] * max(len(shape) for shape in shapes)
    for shape in shapes:
        for dim, size in enumerate(shape, len(out) - len(shape)):
            if size != 1:
                out[dim] = size
    return torch.Size(out)


def unbroadcast(t: Tensor) -> Tensor:
    """A view of ``t`` with its broadcast (stride-0) dims cut to size 1."""
    # One narrow per broadcast dim and no op for the others: in a traced, differentiated
    # loss every view is a node of the backward pass too.
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        if stride == 0 and size > 1:
            t = t.narrow(dim, 0, 1)
    return t


class Normal(dist.Normal):
    """``pyro.distributions.Normal``; its log density costs three passes over the values."""

    def rsample(self, sample_shape=()) -> Tensor:
        # torch's draws through torch.normal(zeros, ones) while a trace is recorded (two
        # arrays made and one op of three passes at every call of the trace); randn draws
        # the same numbers from the generator in one pass.
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        formula, operands = self.elementwise_terms(value)
        return formula(*operands)

    def to_event(self, reinterpreted_batch_ndims=None):
        return summed_events(super().to_event(reinterpreted_batch_ndims))

    def elementwise_terms(self, value: Tensor):
        """(formula, operands) of the log density: ``log_prob`` is the formula on the
        operands; :class:`EventSum` runs it on chunks of them."""
        scale = unbroadcast(self.scale)
        return _normal_log_density, (value, self.loc, scale, scale.log() + _HALF_LOG_2PI)


class StandardNormal(Normal):
    """``Normal(0, 1)``: the prior of the linear-Gaussian models. Its log density
    is -z^2/2 - log(2 pi)/2, with no pass for the zero loc and unit scale (in a traced,
    differentiated loss each pass is two nodes, one forward and one backward).

    Built as ``StandardNormal(loc, scale)`` from tensors that hold zeros and ones (their
    shapes and dtype are the distribution's); ``expand`` keeps the class.
    """

    def elementwise_terms(self, value: Tensor):
        return _standard_normal_log_density, (value,)


# The formulas run in place on their first fresh temporary when no gradient is recorded:
# the standard normal's with the same numbers, the Normal's within a few roundings.


def _normal_log_density(value: Tensor, loc: Tensor, scale: Tensor,
                        log_norm: Tensor) -> Tensor:
    residual = value - loc
    full = broadcast_shape(residual.shape, scale.shape, log_norm.shape)
    # (A trace may run later with autograd, which cannot go through out=.)
    if torch.is_grad_enabled() or torch.jit.is_tracing() or residual.shape != full:
        return -0.5 * (residual / scale).square() - log_norm
    # -(r / scale)^2 / 2 - log_norm in two passes over the residuals r: one by the
    # reciprocal of scale * sqrt(2) (a division takes several times longer per value on
    # the CPUs measured), one fused -r^2 - log_norm. A few roundings from the other path.
    in_place(torch.Tensor.mul_, residual, scale.reciprocal().mul_(math.sqrt(0.5)))
    return in_place(_minus_square, residual, -log_norm)


def _minus_square(t: Tensor, offset: Tensor) -> Tensor:
    """offset - t^2, in t's array."""
    return torch.addcmul(offset, t, t, value=-1, out=t)


def _standard_normal_log_density(value: Tensor) -> Tensor:
    if torch.is_grad_enabled():
        return -0.5 * value.square() - _HALF_LOG_2PI
    return value.square().mul_(-0.5).sub_(_HALF_LOG_2PI)


def standard_normal(like: Tensor, size: int) -> StandardNormal:
    """N(0, I_size) in the dtype and device of ``like``."""
    return StandardNormal(like.new_zeros(size), like.new_ones(()).expand(size))


class Bernoulli(dist.Bernoulli):
    """``pyro.distributions.Bernoulli``; with logits and binary values,
    log p = logsigmoid((2x - 1) l)."""

    def log_prob(self, value: Tensor) -> Tensor:
        terms = self.elementwise_terms(value)
        if terms is None:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        formula, operands = terms
        return formula(*operands)

    def to_event(self, reinterpreted_batch_ndims=None):
        return summed_events(super().to_event(reinterpreted_batch_ndims))

    def elementwise_terms(self, value: Tensor):
        """(formula, operands) of the short formula, or None where Pyro's applies (no
        logits, values that are not binary, or a trace that would freeze the check)."""
        # A trace freezes the check's answer: unless its caller says that answer holds
        # at every call, a trace takes Pyro's formula.
        recording = _RECORDING.get()
        may_freeze = _CHECK_MAY_BE_FROZEN.get()
        frozen_check = (torch.jit.is_tracing() or recording) and not may_freeze
        if "logits" not in self.__dict__ or frozen_check:
            return None
        small = unbroadcast(value)
        # fx cannot read the check's answer; the caller vouches that it is yes.
        if not (recording or _binary(small)):
            return None
        return _logsigmoid_of_product, (self.logits, 2 * small - 1)


def _binary(values: Tensor) -> bool:
    return bool(((values == 0) | (values == 1)).all())


def _logsigmoid_of_product(logits: Tensor, signs: Tensor) -> Tensor:
    return F.logsigmoid(logits * signs)


# ------------------------------------------------------------- sums over event dims

# Values per chunk: 1 MB of float32.
CHUNK_VALUES = 2**18


class EventSum(dist.Independent):
    """``Independent`` over one of the library's distributions, whose ``log_prob`` works
    chunk by chunk and in place when no gradient is recorded (see the module's doc)."""

    def log_prob(self, value: Tensor) -> Tensor:
        terms = None if _autograd_or_trace(self) else self.base_dist.elementwise_terms(value)
        if terms is None:
            return super().log_prob(value)
        formula, operands = terms
        base = self.base_dist
        shape = broadcast_shape(value.shape, base.batch_shape + base.event_shape)
        return _summed_in_chunks(formula, operands, shape, self.reinterpreted_batch_ndims)

    def to_event(self, reinterpreted_batch_ndims=None):
        return summed_events(super().to_event(reinterpreted_batch_ndims))


def summed_events(independent):
    """``independent`` (what Pyro's ``to_event`` returned) as an :class:`EventSum` when
    it reinterprets dims of a distribution that has ``elementwise_terms``."""
    if type(independent) is dist.Independent and hasattr(independent.base_dist,
                                                          "elementwise_terms"):
        return EventSum(independent.base_dist, independent.reinterpreted_batch_ndims)
    return independent


def _autograd_or_trace(fn) -> bool:
    # (torch.fx records the joint loss with autograd on, so is_grad_enabled covers it.)
    return torch.is_grad_enabled() or torch.jit.is_tracing() or fn._validate_args


def _summed_in_chunks(formula: Callable[..., Tensor], operands: tuple[Tensor, ...],
                      shape: torch.Size, event_dims: int) -> Tensor:
    dims = tuple(range(-event_dims, 0))
    slices = getattr(formula, "event_dim_first", False)
    batch = len(shape) - event_dims
    rows = shape[0] if batch > 0 else 1
    step = max(1, CHUNK_VALUES // max(1, math.prod(shape[1:])))
    if step >= rows or getattr(formula, "whole_array", False):
        return _event_sum(formula(*operands).expand(shape), dims, slices)
    out = None
    for start in range(0, rows, step):
        part = formula(*(_rows(t, len(shape), start, step) for t in operands))
        part = _event_sum(part.expand(min(step, rows - start), *shape[1:]), dims, slices)
        if out is None:
            out = part.new_empty(shape[:batch])
        out[start:start + step] = part
    return out


# Event sizes up to this are summed slice by slice (see _event_sum).
_SLICED_SUM_MAX = 6


def event_dim_first(formula: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark an elementwise formula whose (..., D) values are a view of an array laid out
    event dim first: each slice [..., j] a contiguous array. Their sum over the event dim
    is then taken slice by slice, each row's as ((v0 + v1) + v2) + ...: torch's own
    reduction over an outer dim rounds a row differently with the number of rows."""
    formula.event_dim_first = True
    return formula


def whole_array(formula: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark an elementwise formula that makes no temporary of its values' size (it works
    in the array of one of its operands): it runs on the whole array at once, since
    chunks would only add calls (a PPCA's 1000 x 64 x 13 values: 0.3 ms a call of
    ``log_marginal``)."""
    formula.whole_array = True
    return formula


def _event_sum(values: Tensor, dims: tuple[int, ...], slices: bool = False) -> Tensor:
    """``values.sum(dims)``. A single event dim is summed one slice at a time where it is
    short (the 2 latents of a PPCA: torch's reduction over a last dim of 2 takes ten
    times longer than one elementwise add of its two slices, break-even near 8 values),
    or where ``slices`` says that its slices are contiguous arrays (13 x 20160 values:
    38 us, against 103 us for torch's reduction over rows of 13). Each row's sum is then
    ((v0 + v1) + v2) + ..., whatever the array it is part of. (torch's reduction over an
    outer dim, faster still, rounds a row differently with the number of rows.)"""
    size = values.shape[-1] if values.dim() else 0
    if len(dims) != 1 or size < 2 or not (slices or size <= _SLICED_SUM_MAX):
        return values.sum(dims)
    out = values[..., 0] + values[..., 1]
    for j in range(2, size):
        out.add_(values[..., j])
    return out


def _rows(t: Tensor, ndim: int, start: int, length: int) -> Tensor:
    """Rows [start, start + length) of the leading dim of a ``ndim``-dim broadcast shape,
    for an operand that broadcasts to it (one that lacks that dim, or has size 1 there,
    is the same for every row)."""
    if t.dim() < ndim or t.shape[0] == 1:
        return t
    return t.narrow(0, start, min(length, t.shape[0] - start))
