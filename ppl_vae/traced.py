"""The SVI loss traced once per minibatch shape with ``torch.jit.trace``.

Each step of Pyro's ``Trace_ELBO`` spends about 2 ms of Python on a VAE (tracing the
guide, replaying the model, plates, messages, bookkeeping) before any arithmetic. For a
model of static structure the ops it ends up running are the same at every step, so
they can be recorded once, with the parameters as inputs (through
``torch.nn.utils.stateless``, so module-local parameters need no global param store),
and replayed without the Python. Random draws are recorded as random ops, so each call
still draws afresh from torch's generator.

For fits of ``RECORD_GRADIENTS_FROM_STEPS`` steps or more, the gradients are recorded
with the loss as one graph (:mod:`ppl_vae.joint_trace`), checked once against autograd's
on the same draws; where that cannot be recorded, or differs, the forward ops alone are
traced as before.

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

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from ppl_vae import joint_trace
from ppl_vae.seeding import random_state, set_random_state

# Calls after the first that are still checked against the plain loss, each on fresh
# draws; a branch taken with probability 1/2 escapes all of them with probability 1/256.
CHECKED_CALLS = 8
# Recording the gradients with the loss (joint_trace) costs 0.1-0.6 s per minibatch shape
# against 0.02-0.1 s for the forward alone, and saves 0.16 ms (PPCA 64x8, a 0.74 ms step)
# to 0.5 ms (a flow encoder, 5.8 ms) a step: fits shorter than this trace the forward alone.
RECORD_GRADIENTS_FROM_STEPS = 100


class TracedLoss(nn.Module):
    """Wraps an ``ELBOModule``: same call ``(x, idx=..., num_data=...)``, same numbers."""

    def __init__(self, loss_module: nn.Module, record_gradients: bool = True):
        super().__init__()
        self.loss_module = loss_module
        self.record_gradients = record_gradients
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
            set_random_state(after)
            return out
        if traced is None:
            return self.loss_module(x, idx=idx, num_data=num_data)
        if self._unchecked[key]:
            return self._checked_call(key, traced, x, idx, num_data)
        return traced(x, idx, *self._params)

    def is_traced(self) -> bool:
        """True while every minibatch shape seen so far runs traced."""
        return bool(self._traces) and all(t is not None for t in self._traces.values())

    def records_gradients(self) -> bool:
        """True while every minibatch shape seen so far runs the loss and its gradients
        as one recorded graph (``joint_trace``), not the forward alone."""
        return bool(self._traces) and all(isinstance(t, joint_trace.JointLoss)
                                          for t in self._traces.values())

    def _checked_call(self, key, traced, x, idx, num_data) -> Tensor:
        """The traced loss, compared with the plain one on the same fresh draws."""
        self._unchecked[key] -= 1
        state = random_state()
        with torch.no_grad():
            expected = self.loss_module(x, idx=idx, num_data=num_data)
        after = random_state()
        set_random_state(state)
        got = traced(x, idx, *self._params)
        # The trace draws from torch alone; Python's and numpy's generators move on as the
        # plain loss moved them, so that the next check sees fresh draws of theirs too.
        set_random_state(after)
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
        set_random_state(state)
        return self.loss_module(x, idx=idx, num_data=num_data)

    def _trace(self, x, idx, num_data):
        if self.record_gradients:
            joint, after = self._record_joint(x, idx, num_data)
            if joint is not None:
                return joint, after
        return self._trace_forward(x, idx, num_data)

    def _record_joint(self, x, idx, num_data):
        """The loss and its gradients recorded together (``joint_trace``), checked on one
        call against the plain loss and autograd's gradients under the same draws; None
        where torch.fx cannot record the code or the check fails (then the forward ops
        alone are traced)."""
        module, params = self.loss_module, self._params
        state = random_state()
        try:
            joint = joint_trace.record(module, self._names, params, x, idx, num_data)
        except Exception:  # noqa: BLE001 - any failure means: trace the forward alone
            set_random_state(state)
            return None, None
        set_random_state(state)
        # Every value autograd differentiates, so that a gradient the recording missed
        # (an input it did not see) is a mismatch, not a parameter left untrained.
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        loss = module(x, idx=idx, num_data=num_data)
        grads = torch.autograd.grad(loss, [params[i] for i in trainable], allow_unused=True)
        used = [i for i, g in zip(trainable, grads, strict=True) if g is not None]
        expected = [loss.detach(), *(g for g in grads if g is not None)]
        after = random_state()
        set_random_state(state)
        got = joint.loss_and_grads(x, idx, params)
        set_random_state(state)
        # Equal lists of differentiated values make got and expected the same length.
        if used != joint.trainable or not all(
                _close_arrays(g, e) for g, e in zip(got, expected, strict=True)):
            return None, None
        return joint, after

    def _trace_forward(self, x, idx, num_data):
        module, names, params = self.loss_module, self._names, self._params

        def loss(x, idx, *values):
            with _reparametrize_module(module, dict(zip(names, values, strict=True))):
                return module(x, idx=idx, num_data=num_data)

        state = random_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                traced = torch.jit.trace(loss, (x, idx, *params), check_trace=False)
                set_random_state(state)
                expected = module(x, idx=idx, num_data=num_data).detach()
                after = random_state()
                set_random_state(state)
                got = traced(x, idx, *params).detach()
            except Exception as error:  # noqa: BLE001 - any failure means: run it plainly
                set_random_state(state)
                warnings.warn(f"the loss could not be traced ({error}); running it plainly",
                              stacklevel=4)
                return None, None
        set_random_state(state)
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
    # NaN in both agrees: the loss is NaN whatever runs it, and fit then names the site,
    # rather than warning that the model's structure is not static.
    return bool(torch.allclose(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True))


def _close_arrays(got: Tensor, expected: Tensor) -> bool:
    # Gradients: the same ops in the same order, so equal up to rounding; the absolute
    # tolerance follows the array's own size.
    atol = 1e-6 * max(1.0, float(expected.abs().max())) if expected.numel() else 0.0
    return got.shape == expected.shape and bool(
        torch.allclose(got, expected, rtol=1e-5, atol=atol, equal_nan=True))
