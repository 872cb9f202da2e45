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

Both are drop-in subclasses (``expand``, ``to_event``, sampling and supports are
Pyro's), so every estimator, AIS and SVI reuse them through the model as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor

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
        scale = unbroadcast(self.scale)
        standardized = (value - self.loc) / scale
        return -0.5 * standardized.square() - (scale.log() + _HALF_LOG_2PI)


class StandardNormal(Normal):
    """``Normal(0, 1)``: the prior of the linear-Gaussian models. Its log density
    is -z^2/2 - log(2 pi)/2, with no pass for the zero loc and unit scale (in a traced,
    differentiated loss each pass is two nodes, one forward and one backward).

    Built as ``StandardNormal(loc, scale)`` from tensors that hold zeros and ones (their
    shapes and dtype are the distribution's); ``expand`` keeps the class.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return -0.5 * value.square() - _HALF_LOG_2PI


def standard_normal(like: Tensor, size: int) -> StandardNormal:
    """N(0, I_size) in the dtype and device of ``like``."""
    return StandardNormal(like.new_zeros(size), like.new_ones(()).expand(size))


class Bernoulli(dist.Bernoulli):
    """``pyro.distributions.Bernoulli``; with logits and binary values,
    log p = logsigmoid((2x - 1) l)."""

    def log_prob(self, value: Tensor) -> Tensor:
        # A trace freezes the check's answer: unless its caller says that answer holds
        # at every call, a trace takes Pyro's formula.
        recording = _RECORDING.get()
        may_freeze = _CHECK_MAY_BE_FROZEN.get()
        frozen_check = (torch.jit.is_tracing() or recording) and not may_freeze
        if "logits" not in self.__dict__ or frozen_check:
            return super().log_prob(value)
        small = unbroadcast(value)
        # fx cannot read the check's answer; the caller vouches that it is yes.
        if not (recording or bool(((small == 0) | (small == 1)).all())):
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        return F.logsigmoid(self.logits * (2 * small - 1))
