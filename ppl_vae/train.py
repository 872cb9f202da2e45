"""fit(): stochastic variational inference with minibatches, progress, and a history."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from tqdm.auto import tqdm

from ppl_vae.estimators import check_guide_covers
from ppl_vae.traced import TracedLoss
from ppl_vae.validation import as_data, one_of, positive_int


@dataclass(frozen=True)
class FitResult:
    """What a call to :func:`fit` did.

    Attributes
    ----------
    history : ndarray of shape (num_steps,)
        ELBO per datapoint at each step (the minibatch estimate, in nats).
    step_seconds : ndarray of shape (num_steps,)
        Wall-clock seconds of each step.
    num_steps : int
        Steps run.
    """

    history: np.ndarray
    step_seconds: np.ndarray
    num_steps: int

    @property
    def final_elbo(self) -> float:
        """Mean ELBO per datapoint over the last 10% of steps (smooths minibatch noise)."""
        tail = max(1, self.num_steps // 10)
        return float(self.history[-tail:].mean())


def fit(
    model,
    guide,
    x,
    *,
    epochs: int | None = None,
    num_steps: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    optimizer=None,
    loss: ELBO | None = None,
    seed: int | None = None,
    progress: bool = True,
    train_model: bool = True,
    binarize: str | None = None,
    callback: Callable[[int, float], bool | None] | None = None,
    jit: bool = True,
) -> FitResult:
    """Fit ``model`` and ``guide`` to ``x`` by SVI.

    Minibatches are shuffled epochs; each step calls model and guide with the minibatch,
    its row indices ``idx`` and ``num_data=N``, so the ELBO is scaled to the whole set.

    Parameters
    ----------
    model, guide : PyroModule
        Following the ``forward(x, idx=None, num_data=None)`` convention.
    x : Tensor or ndarray of shape (N, D)
    epochs, num_steps : int
        Give exactly one: passes over the data, or optimizer steps.
    batch_size : int, optional
        Rows per step; the whole set when None.
    lr : float
        Learning rate of the default Adam optimizer.
    optimizer : torch.optim.Optimizer subclass or callable(params) -> Optimizer, optional
        A class is built as ``optimizer(params, lr=lr)``; a callable gets the parameters.
    loss : pyro.infer.ELBO, optional
        ``Trace_ELBO(max_plate_nesting=1)`` by default.
    seed : int, optional
        Seeds Pyro/torch and the shuffling.
    progress : bool
        Show a progress bar with the ELBO and speed; False prints nothing.
    train_model : bool
        False fits the guide alone: the model's parameters are left out of the optimizer
        and their gradients switched off while fitting.
    binarize : {None, "dynamic"}
        ``"dynamic"`` redraws x ~ Bernoulli(intensities) for every minibatch.
    callback : callable(step, elbo) -> bool, optional
        Called after every step with the step's index and its ELBO per datapoint; a
        true return value stops fitting there (an early-stopping rule, for example).
        The result then holds only the steps that ran.
    jit : bool
        Trace the loss once per minibatch shape (``ppl_vae.traced.TracedLoss``) and
        replay it without Pyro's per-step Python: the same numbers, about 2 ms less per
        step on a VAE. It needs a model and guide of static structure: the same sites
        and ops at every step, with no Python branch on the data's values. The first
        step of each minibatch shape compares the traced loss with the plain one
        under the same seed and falls back to the plain loss, with a warning, when
        they differ (that catches structure that changes between calls, not a branch
        on values that happens to agree on the first minibatch). False runs Pyro's
        loss as it is.

    Returns
    -------
    FitResult

    Raises
    ------
    ValueError
        On bad input, before any work.
    FloatingPointError
        When the loss becomes NaN or inf; it names the step, and the parameters stay
        those of the last step whose loss was finite.
    """
    one_of(binarize, (None, "dynamic"), "binarize")
    x = _validated_data(x, model, binarize)
    num_data = len(x)
    # Data as the model sees it: dynamic binarization redraws every minibatch (the
    # range of x was checked once, above, so the hot loop skips data.dynamic_binarize's
    # per-call check).
    as_seen = torch.bernoulli if binarize == "dynamic" else _unchanged
    first = torch.zeros(1, dtype=torch.long, device=x.device)
    check_guide_covers(model, guide, as_seen(x[:1]), first, num_data)
    if batch_size is not None:
        batch_size = min(positive_int(batch_size, "batch_size"), num_data)
    batch_size = batch_size or num_data
    total = _total_steps(epochs, num_steps, math.ceil(num_data / batch_size))
    if seed is not None:
        pyro.set_rng_seed(seed)
    loss_fn = (loss or Trace_ELBO(max_plate_nesting=1))(model, guide)
    params = list((loss_fn if train_model else guide).parameters())
    opt = _make_optimizer(optimizer, params, lr)
    if jit:
        loss_fn = TracedLoss(loss_fn)
    history, seconds = np.empty(total), np.empty(total)
    with _frozen(model, not train_model), pyro.validation_enabled(False):
        batches = _minibatches(num_data, batch_size, total, x.device, seed)
        bar = tqdm(total=total, disable=not progress, desc="SVI", unit="step")
        for step, idx in enumerate(batches):
            start = time.perf_counter()
            xb = as_seen(x[idx])
            value = _step(loss_fn, opt, xb, idx, num_data, step)
            seconds[step] = time.perf_counter() - start
            history[step] = -value / num_data
            if progress:
                bar.update()
                bar.set_postfix(elbo=f"{history[step]:.3f}", refresh=False)
            if callback is not None and callback(step, float(history[step])):
                total = step + 1
                break
        bar.close()
    return FitResult(history=history[:total], step_seconds=seconds[:total], num_steps=total)


def _unchanged(x):
    return x


def _validated_data(x, model, binarize):
    if binarize is None:
        return as_data(x, model)
    x = as_data(x, model, check_values=False)
    if x.min() < 0 or x.max() > 1:
        raise ValueError(
            f"binarize='dynamic' needs x to hold intensities in [0, 1], got values in "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )
    return x


def _total_steps(epochs, num_steps, steps_per_epoch) -> int:
    if (epochs is None) == (num_steps is None):
        raise ValueError(
            f"give exactly one of epochs and num_steps, got epochs={epochs!r}, "
            f"num_steps={num_steps!r}"
        )
    if num_steps is not None:
        return positive_int(num_steps, "num_steps")
    return positive_int(epochs, "epochs") * steps_per_epoch


def _make_optimizer(optimizer, params, lr):
    if not params:
        raise ValueError("there are no parameters to optimize")
    if optimizer is None:
        return torch.optim.Adam(params, lr=lr)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer(params, lr=lr)
    return optimizer(params)


def _minibatches(num_data, batch_size, total, device, seed):
    """Row indices of ``total`` minibatches, from shuffled epochs."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    steps = 0
    while True:
        order = torch.randperm(num_data, generator=generator).to(device)
        for idx in order.split(batch_size):
            if steps == total:
                return
            steps += 1
            yield idx


def _step(loss_fn, opt, xb, idx, num_data, step) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(xb, idx=idx, num_data=num_data)
    value = loss.item()
    if not math.isfinite(value):
        # Checked before backward(), so the parameters are still those that gave the
        # last finite loss.
        raise FloatingPointError(
            f"the loss became {value} at step {step}; the parameters are left as they "
            "were after the last finite step (try a smaller lr, or check the data)"
        )
    loss.backward()
    opt.step()
    return value


@contextlib.contextmanager
def _frozen(model, freeze: bool):
    """Switch off the model's gradients while the guide is fitted alone."""
    if not freeze:
        yield
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
