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
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for size, stride in zip(t.shape, t.stride(), strict=True))
    return t[index]


class Normal(dist.Normal):
    """``pyro.distributions.Normal``; its log density costs three passes over the values."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        scale = unbroadcast(self.scale)
        standardized = (value - self.loc) / scale
        return -0.5 * standardized.square() - (scale.log() + _HALF_LOG_2PI)


class Bernoulli(dist.Bernoulli):
    """``pyro.distributions.Bernoulli``; with logits and binary values,
    log p = logsigmoid((2x - 1) l)."""

    def log_prob(self, value: Tensor) -> Tensor:
        # A trace freezes the check's answer: unless its caller says that answer holds
        # at every call, a trace takes Pyro's formula.
        frozen_check = torch.jit.is_tracing() and not _CHECK_MAY_BE_FROZEN.get()
        if "logits" not in self.__dict__ or frozen_check:
            return super().log_prob(value)
        small = unbroadcast(value)
        if not bool(((small == 0) | (small == 1)).all()):
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        return F.logsigmoid(self.logits * (2 * small - 1))
