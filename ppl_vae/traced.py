"""The SVI loss traced once per minibatch shape with ``torch.jit.trace``.

Each step of Pyro's ``Trace_ELBO`` spends about 2 ms of Python on a VAE (tracing the
guide, replaying the model, plates, messages, bookkeeping) before any arithmetic. For a
model of static structure the ops it ends up running are the same at every step, so
they can be recorded once, with the parameters as inputs (through
``torch.nn.utils.stateless``, so module-local parameters need no global param store),
and replayed without the Python. Random draws are recorded as random ops, so each call
still draws afresh from torch's generator.

The first call of each shape is checked against the plain loss under the same seed,
and so are the next ``CHECKED_CALLS`` calls, each with its own fresh draws: a trace
freezes whatever Python decided while it was recorded (a branch on ``random.random()``,
on a sampled value, on the data), and only calls that decide otherwise can show it. A
mismatch falls back to the plain loss, with a warning. A branch that the checked calls
happen to take alike cannot be seen: models with such branches need
``fit(..., jit=False)``.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.util
import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

# Calls after the first that are still checked against the plain loss, each on fresh
# draws; a branch taken with probability 1/2 escapes all of them with probability 1/256.
CHECKED_CALLS = 8


class TracedLoss(nn.Module):
    """Wraps an ``ELBOModule``: same call ``(x, idx=..., num_data=...)``, same numbers."""

    def __init__(self, loss_module: nn.Module):
        super().__init__()
        self.loss_module = loss_module
        # Optimizers update parameters in place, so the same tensors feed every call.
        # Buffers are inputs too: a value changed in place between steps (a KL warm-up
        # weight, for example) must not be frozen into the trace as a constant.
        named = [*loss_module.named_parameters(), *loss_module.named_buffers()]
        self._names, self._params = zip(*named, strict=True)
        self._traces: dict[tuple, object] = {}
        self._unchecked: dict[tuple, int] = {}

    def forward(self, x: Tensor, idx: Tensor, num_data: int) -> Tensor:
        key = (x.shape, x.dtype, idx.shape, num_data)
        traced = self._traces.get(key, False)
        if traced is False:
            traced, after = self._trace(x, idx, num_data)
            self._traces[key], self._unchecked[key] = traced, CHECKED_CALLS
            if traced is None:
                return self.loss_module(x, idx=idx, num_data=num_data)
            # Traced from the first call (a resumed run replays the same ops as an
            # uninterrupted one, bit for bit); the generators then move on as the plain
            # loss moved them (Python's and numpy's too, which a trace does not touch).
            out = traced(x, idx, *self._params)
            pyro.util.set_rng_state(after)
            return out
        if traced is None:
            return self.loss_module(x, idx=idx, num_data=num_data)
        if self._unchecked[key]:
            return self._checked_call(key, traced, x, idx, num_data)
        return traced(x, idx, *self._params)

    def is_traced(self) -> bool:
        """True while every minibatch shape seen so far runs traced."""
        return bool(self._traces) and all(t is not None for t in self._traces.values())

    def _checked_call(self, key, traced, x, idx, num_data) -> Tensor:
        """The traced loss, compared with the plain one on the same fresh draws."""
        self._unchecked[key] -= 1
        state = pyro.util.get_rng_state()
        with torch.no_grad():
            expected = self.loss_module(x, idx=idx, num_data=num_data)
        after = pyro.util.get_rng_state()
        pyro.util.set_rng_state(state)
        got = traced(x, idx, *self._params)
        # The trace draws from torch alone; Python's and numpy's generators move on as the
        # plain loss moved them, so that the next check sees fresh draws of theirs too.
        pyro.util.set_rng_state(after)
        if _close(got.detach(), expected):
            return got
        warnings.warn(
            f"the traced loss ({float(got.detach())}) differs from the plain one "
            f"({float(expected)}) on fresh draws: the model or guide decides something in "
            "Python that the trace froze (a random branch, a branch on a sampled value); "
            "running it plainly from now on (pass jit=False to skip tracing)",
            stacklevel=4,
        )
        self._traces[key] = None
        pyro.util.set_rng_state(state)
        return self.loss_module(x, idx=idx, num_data=num_data)

    def _trace(self, x, idx, num_data):
        module, names, params = self.loss_module, self._names, self._params

        def loss(x, idx, *values):
            with _reparametrize_module(module, dict(zip(names, values, strict=True))):
                return module(x, idx=idx, num_data=num_data)

        state = pyro.util.get_rng_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                traced = torch.jit.trace(loss, (x, idx, *params), check_trace=False)
                pyro.util.set_rng_state(state)
                expected = module(x, idx=idx, num_data=num_data).detach()
                after = pyro.util.get_rng_state()
                pyro.util.set_rng_state(state)
                got = traced(x, idx, *params).detach()
            except Exception as error:  # noqa: BLE001 - any failure means: run it plainly
                pyro.util.set_rng_state(state)
                warnings.warn(f"the loss could not be traced ({error}); running it plainly",
                              stacklevel=4)
                return None, None
        pyro.util.set_rng_state(state)
        if not _close(got, expected):
            warnings.warn(
                f"the traced loss ({float(got)}) differs from the plain one "
                f"({float(expected)}): the model's structure is not static; running it "
                "plainly (pass jit=False to skip tracing)",
                stacklevel=4,
            )
            return None, None
        return traced, after


def _close(got: Tensor, expected: Tensor) -> bool:
    return bool(torch.allclose(got, expected, rtol=1e-5, atol=1e-6))
