"""fit(): stochastic variational inference with minibatches, progress, and a history."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoContinuous
from tqdm.auto import tqdm

from ppl_vae.batches import Batches
from ppl_vae.checkpoint import CheckpointError, Saver, load_state
from ppl_vae.checkpoint import load as checkpoint_load
from ppl_vae.densities import refuse_nan_in_trace
from ppl_vae.distributed import agree, rank_and_size, wrapped
from ppl_vae.gradients import check_gradient, check_reparameterized, estimator
from ppl_vae.interrupts import Interrupted, Signals
from ppl_vae.models.distributions import binary_check_may_be_frozen
from ppl_vae.objectives import LR_SCHEDULES, Warmup, loss_of, lr_factor, make_optimizer
from ppl_vae.programs import PyroProgram, as_programs, required_guide
from ppl_vae.seeding import check_seed, rng_state, seed_everything, set_rng_state
from ppl_vae.settings import frozen, module_local
from ppl_vae.structure import (
    check_guide_covers,
    check_observed,
    check_supports,
    refuse_latents_drawn_given_auxiliaries,
)
from ppl_vae.traced import RECORD_GRADIENTS_FROM_STEPS, TracedLoss
from ppl_vae.validation import as_data, one_of, positive_int, positive_number

# Steps between the in-memory snapshots that a NaN rollback replays from. The parameters
# are checked for NaN and inf at each snapshot and wherever they are read (a checkpoint, a
# callback, the end), not after every step: the check costs ~4% of a VAE step, and the
# replay from the snapshot finds the step that broke them exactly.
ANCHOR_EVERY = 100
_KEYS = ("model", "guide", "optimizer", "step", "rng", "batches", "history", "step_seconds",
         "fit")


@dataclass(frozen=True)
class FitResult:
    """What a call to :func:`fit` did.

    Attributes
    ----------
    history : ndarray of shape (num_steps,)
        The objective per datapoint at each step (the minibatch estimate, in nats): the
        ELBO, the IWAE bound with ``objective="iwae"``, and with ``kl_warmup`` the
        warm-up's objective, whose latent terms are weighted by beta < 1 until the
        warm-up ends (so it reads above the ELBO there).
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
        """Mean of ``history`` over the last 10% of steps (smooths minibatch noise): the
        ELBO per datapoint (the IWAE bound with ``objective="iwae"``) once any warm-up
        has ended."""
        tail = max(1, self.num_steps // 10)
        return float(self.history[-tail:].mean())


@module_local
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
    objective: str = "elbo",
    num_particles: int = 1,
    gradient: str = "reparam",
    kl_warmup: int | None = None,
    lr_schedule: str | Callable[[int, int], float] = "constant",
    clip_norm: float | None = None,
    seed: int | None = None,
    progress: bool = True,
    train_model: bool = True,
    binarize: str | None = None,
    callback: Callable[[int, float], bool | None] | None = None,
    jit: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    checkpoint_extra: Mapping | None = None,
    plate: str | None = None,
) -> FitResult:
    """Fit ``model`` and ``guide`` to ``x`` by SVI on shuffled minibatches (every option
    and the errors raised: :doc:`training`).

    Parameters
    ----------
    model, guide, x : Pyro programs, Tensor or ndarray of shape (N, D)
    epochs, num_steps, batch_size : int
        Exactly one of passes over the data or optimizer steps; rows per step (None: N).
    lr, optimizer, lr_schedule, clip_norm : optional
        (Fused) Adam's rate, or a ``torch.optim`` class; its schedule; a gradient bound.
    loss, objective, num_particles, gradient, kl_warmup : optional
        A Pyro ELBO, or "elbo"/"iwae" with K samples; "reparam"/"stl"/"dreg"; warm-up.
    seed, progress, callback, train_model, binarize, jit, plate : optional
        Seeding, progress bar, per-step callback, guide alone, binarization, tracing.
    checkpoint, checkpoint_every, resume, checkpoint_extra : optional
        A file of the whole training state, how often, continue bit for bit, extras.

    Returns
    -------
    FitResult

    Examples
    --------
    >>> import torch, ppl_vae
    >>> from ppl_vae import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model, guide, x = models.PPCA(5, 2), guides.LinearEncoder(5, 2), torch.randn(64, 5)
    >>> result = ppl_vae.fit(model, guide, x, epochs=25, batch_size=32, lr=0.05, progress=False)
    >>> bool(result.history[-10:].mean() > result.history[:10].mean())  # the ELBO rose
    True
    """
    one_of(binarize, (None, "dynamic"), "binarize")
    lr = positive_number(lr, "lr")
    check_gradient(gradient, objective=objective, custom_loss=loss is not None,
                   kl_warmup=kl_warmup)
    loss = loss_of(loss, objective, positive_int(num_particles, "num_particles"))
    if kl_warmup is not None:
        kl_warmup = positive_int(kl_warmup, "kl_warmup")
    if not callable(lr_schedule):
        one_of(lr_schedule, LR_SCHEDULES, "lr_schedule")
    if clip_norm is not None:
        clip_norm = positive_number(clip_norm, "clip_norm")
    seed = check_seed(seed)
    required_guide(guide)
    x = _validated_data(x, model, binarize)
    num_data = len(x)
    # Dynamic binarization draws each minibatch; its rounding stands for them here.
    model, guide = as_programs(model, guide, x.round() if binarize else x, plate=plate,
                               proposal=False)
    # Data as the model sees it: dynamic binarization redraws every minibatch (the
    # range of x was checked once, above, so the hot loop skips data.dynamic_binarize's
    # per-call check).
    as_seen = torch.bernoulli if binarize == "dynamic" else _unchanged
    first = torch.zeros(1, dtype=torch.long, device=x.device)
    probe = x[:1].round() if binarize else x[:1]
    check_observed(model, probe, first, num_data)
    # SVI's objective takes the guide's joint density as q, as the estimators do.
    refuse_latents_drawn_given_auxiliaries(
        check_guide_covers(model, guide, probe, first, num_data))
    check_supports(model, guide, probe, first, num_data)
    if gradient != "reparam":
        check_reparameterized(gradient, model, guide, probe, first, num_data)
        loss = estimator(gradient, num_particles)
    if batch_size is not None:
        batch_size = min(positive_int(batch_size, "batch_size"), num_data)
    batch_size = batch_size or num_data
    _refuse_coupled_minibatches(guide, batch_size, num_data)
    total = _total_steps(epochs, num_steps, math.ceil(num_data / batch_size))
    saver = Saver.checked(checkpoint, checkpoint_every, resume, checkpoint_extra)
    signature = {"num_data": num_data, "batch_size": batch_size, "seed": seed,
                 "train_model": bool(train_model), "binarize": binarize,
                 "kl_warmup": kl_warmup}
    return fit_trusted(model, guide, x, as_seen=as_seen, batch_size=batch_size, total=total,
                       lr=lr, optimizer=optimizer, loss=loss, seed=seed, progress=progress,
                       train_model=train_model, callback=callback, jit=jit, saver=saver,
                       resume=resume, signature=signature, kl_warmup=kl_warmup,
                       lr_schedule=lr_schedule, clip_norm=clip_norm)


def fit_trusted(model, guide, x, *, as_seen=None, batch_size, total, lr=1e-3, optimizer=None,
                loss=None, seed=None, progress=True, train_model=True, callback=None, jit=True,
                saver=None, resume=False, signature=None, kl_warmup=None,
                lr_schedule="constant", clip_norm=None) -> FitResult:
    """The core of :func:`fit`, for callers inside the library that have validated
    every argument already (``total`` steps of ``batch_size`` rows; ``x`` a checked
    tensor). It trusts its inputs."""
    as_seen = as_seen or _unchanged
    saver = saver or Saver(None, None, {})
    signature = signature or {"num_data": len(x), "batch_size": batch_size, "seed": seed,
                              "train_model": bool(train_model), "binarize": None}
    num_data = len(x)
    if seed is not None:
        seed_everything(seed)
    loss = loss or Trace_ELBO(max_plate_nesting=1)
    warmup = Warmup(model, guide, kl_warmup, x.device) if kl_warmup else None
    loss_fn = loss(warmup.model, warmup.guide) if warmup else loss(model, guide)
    params = list((loss_fn if train_model else guide).parameters())
    opt = make_optimizer(optimizer, params, lr)
    run = _Training(model, guide, opt, params, Batches(num_data, batch_size, seed, x.device),
                    total, signature, warmup=warmup, lr_schedule=lr_schedule,
                    clip_norm=clip_norm)
    if resume:
        run.load_state_dict(checkpoint_load(saver.path, _KEYS), saver.path)
    rank = rank_and_size()[0]
    if rank != 0:  # one progress bar and one writer of checkpoints; every rank checks the
        # parameters at the same steps, since a rollback replays collective steps
        progress, saver = False, Saver(None, saver.every, {})
    # The model's gradients are off while the guide is fitted alone.
    model_frozen = frozen(None if train_model else model)
    # Binary batches at every step: a traced loss may take the Bernoulli's short formula.
    binary = as_seen is torch.bernoulli or bool(((x == 0) | (x == 1)).all())
    short_formula = binary_check_may_be_frozen() if binary else contextlib.nullcontext()
    with model_frozen, pyro.validation_enabled(False), Signals() as signals, short_formula:
        # Wrapped once the model is frozen: DDP syncs only what requires grad.
        # Whether to record the gradients too is a function of the call (its total steps),
        # so a resumed run takes the same path as an uninterrupted one.
        traced = TracedLoss(loss_fn, record_gradients=total >= RECORD_GRADIENTS_FROM_STEPS)
        run.loss_fn = wrapped(traced if jit else loss_fn)
        _loop(run, x, as_seen, callback, saver, signals, progress)
    return run.result()


def _loop(run, x, as_seen, callback, saver, signals, progress) -> None:
    """Steps from ``run.step`` to ``run.total``: checkpoints, interruptions, rollback."""
    bar = tqdm(total=run.total, initial=run.step, disable=not progress, desc="SVI", unit="step")
    anchor = None
    watch = _DivergenceWatch()
    # A callback may read the parameters after every step: they are checked before it.
    every_step = callback is not None
    try:
        while run.step < run.total:
            if anchor is None or run.step % ANCHOR_EVERY == 0:
                if anchor is not None:
                    run.confirm_finite(anchor, x, as_seen)
                anchor = run.anchor()
            elbo = run.advance(x, as_seen, anchor, signals, check=every_step)
            watch.see(run.step - 1, elbo)
            if progress:
                bar.update()
                bar.set_postfix(elbo=f"{elbo:.3f}", refresh=False)
            try:
                stop = callback is not None and callback(run.step - 1, elbo)
            except KeyboardInterrupt:
                saver.save(run)
                raise
            if stop:
                run.total = run.step
            elif signals.received is not None:
                run.confirm_finite(anchor, x, as_seen)
                raise Interrupted(signals.received, run.step, saver.save(run))
            elif saver.due(run.step) and run.step < run.total:
                run.confirm_finite(anchor, x, as_seen)
                saver.save(run)
        if anchor is not None:
            run.confirm_finite(anchor, x, as_seen)
        saver.save(run)
    finally:
        bar.close()


class _DivergenceWatch:
    """Warn once when the training ELBO falls orders of magnitude below where it began.

    A run whose learning rate is far too large can stay finite while the ELBO drops
    from tens of nats to 1e14: no NaN is raised, and the result is meaningless.
    """

    FACTOR = 100.0

    def __init__(self):
        self.floor: float | None = None  # below it the ELBO has fallen by that factor

    def see(self, step: int, elbo: float) -> None:
        if self.floor is None:
            self.start, self.floor = elbo, elbo - self.FACTOR * max(1.0, abs(elbo))
        elif elbo < self.floor:
            self.floor = -math.inf  # once
            warnings.warn(
                f"the training ELBO fell from {self.start:.4g} (its first step) to "
                f"{elbo:.4g} at step {step}, orders of magnitude lower: the run is "
                "diverging (try a smaller lr, or clip_norm)",
                stacklevel=5,
            )


def _refuse_coupled_minibatches(guide, batch_size: int, num_data: int) -> None:
    fn = guide.fn if isinstance(guide, PyroProgram) else guide
    if batch_size < num_data and isinstance(fn, AutoContinuous):
        raise ValueError(
            f"{type(fn).__name__} draws one latent vector for all {num_data} datapoints, "
            f"so it cannot be trained on minibatches of {batch_size}: leave batch_size "
            "out, or use AutoNormal, whose rows are per datapoint"
        )


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


def _finite(params) -> bool:
    # One fused reduction over all parameters (~0.1 ms for a 400k-weight VAE); norms
    # only overflow for weights beyond ~1e19, which are broken anyway.
    return bool(torch.stack(torch._foreach_norm(params)).isfinite().all())


def _clear_grads(opt) -> None:
    """``opt.zero_grad(set_to_none=True)``. torch's runs inside a profiler range, 10-20 us
    a step (2-3% of a PPCA step); an optimizer's own ``zero_grad`` is called as it is."""
    if type(opt).zero_grad is not torch.optim.Optimizer.zero_grad:
        opt.zero_grad(set_to_none=True)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


def _step(loss_fn, opt, xb, idx, num_data, step, params, clip_norm=None) -> float:
    _clear_grads(opt)
    loss = loss_fn(xb, idx=idx, num_data=num_data)
    value = loss.item()
    if not math.isfinite(value):
        # Checked before backward(), so parameters and optimizer state are still those
        # after the last finite step.
        raise FloatingPointError(
            f"the loss became {value} at step {step}; the parameters and optimizer state "
            "are left as they were after the last finite step (try a smaller lr, or "
            "check the data)"
        )
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    opt.step()
    return value


class _Training:
    """What changes while fitting: one step forward, and a state to save or restore."""

    def __init__(self, model, guide, opt, params, batches: Batches, total: int,
                 signature: dict, warmup: Warmup | None = None, lr_schedule="constant",
                 clip_norm: float | None = None):
        self.model, self.guide, self.opt, self.params = model, guide, opt, params
        self.batches, self.total, self.signature = batches, total, signature
        self.loss_fn = None
        self.warmup, self.lr_schedule, self.clip_norm = warmup, lr_schedule, clip_norm
        self.step = 0
        self.history: list[float] = []
        self.seconds: list[float] = []

    def advance(self, x, as_seen, anchor: dict, signals=None, check: bool = True) -> float:
        """Run step ``self.step``; return its ELBO per datapoint. With ``check``, roll
        back and raise if the step made a parameter NaN or inf.

        Under torch.distributed every rank draws the same global minibatch and takes
        every world_size-th row of it; the loss of each share is scaled to the whole
        dataset, and DDP averages the gradients, so a step estimates the same gradient
        as one process with the whole minibatch. All ranks share one random stream (the
        same seed), so one checkpoint resumes them all.
        """
        start = time.perf_counter()
        self._schedule()
        idx = self.batches.next()
        rank, world = rank_and_size()
        idx = idx[rank::world] if world > 1 else idx
        num_data = self.batches.num_data
        xb = as_seen(x.index_select(0, idx))  # 5x cheaper than x[idx] for a batch of rows
        try:
            value = _step(self.loss_fn, self.opt, xb, idx, num_data, self.step, self.params,
                          self.clip_norm)
        except FloatingPointError:
            if _finite(self.params):
                refuse_nan_in_trace(self.model, self.guide, xb, idx, num_data)
                raise
            value = None
        if value is None:
            # An earlier, unchecked step broke the parameters: find it and roll back to
            # before it (raises); if a replay does not break them again, retry this step.
            self.confirm_finite(anchor, x, as_seen)
            return self.advance(x, as_seen, anchor, signals, check)
        received = signals is not None and signals.received is not None
        value, received = agree(value, received)
        if received and signals.received is None:
            signals.received = signal.SIGTERM  # another rank was signalled
        self.seconds.append(time.perf_counter() - start)
        self.history.append(-value / num_data)
        self.step += 1
        if check and not _finite(self.params):
            self._roll_back(anchor, x, as_seen, bad=self.step - 1)
        return self.history[-1]

    def confirm_finite(self, anchor: dict, x, as_seen) -> None:
        """Return if every parameter is finite; else raise FloatingPointError with the
        parameters and optimizer state of the step before the first one that broke
        them, found by replaying from ``anchor`` (exact: every random state is in it).

        A replay that stays finite (a step that is not reproducible) leaves its state,
        that of a faithful run of the same steps.
        """
        if _finite(self.params):
            return
        done = self.step
        self._rewind(anchor)
        while self.step < done:
            self.advance(x, as_seen, anchor, check=False)
            if not _finite(self.params):
                self._roll_back(anchor, x, as_seen, bad=self.step - 1)

    def _schedule(self) -> None:
        """KL weight and learning rate of this step: functions of the step alone."""
        if self.warmup is not None:
            self.warmup.set_step(self.step)
        if self.lr_schedule != "constant":
            factor = lr_factor(self.lr_schedule, self.step, self.total)
            for group in self.opt.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor

    def _roll_back(self, anchor: dict, x, as_seen, bad: int):
        # Copying every parameter and Adam moment before each step would cost ~10% of
        # a VAE step; replaying from the last anchor (every ANCHOR_EVERY steps) is
        # exact, because every random state is part of it, and costs nothing until
        # a step goes wrong.
        self._rewind(anchor)
        while self.step < bad:
            self.advance(x, as_seen, anchor, check=False)
        raise FloatingPointError(
            f"the parameters became NaN or inf at step {bad} (the loss was still finite); "
            f"parameters and optimizer state are restored to those before that step "
            "(try a smaller lr)"
        )

    def anchor(self) -> dict:
        return copy.deepcopy(self.state_dict())

    def _rewind(self, anchor: dict) -> None:
        # A copy: the optimizer takes the state's tensors as its own and updates them in
        # place, and an anchor may be replayed from twice.
        self._restore(copy.deepcopy(anchor))

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "guide": self.guide.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "num_steps": self.total,
            "rng": rng_state(),
            "batches": self.batches.state_dict(),
            "history": torch.tensor(self.history, dtype=torch.float64),
            "step_seconds": torch.tensor(self.seconds, dtype=torch.float64),
            "fit": dict(self.signature),
        }

    def load_state_dict(self, state: dict, path) -> None:
        """Resume from a checkpoint, after checking it belongs to this call."""
        saved = state["fit"]
        for key, value in self.signature.items():
            if saved.get(key) != value:
                raise CheckpointError(
                    f"{path} was written by a fit with {key}={saved.get(key)!r}; this "
                    f"call has {key}={value!r}"
                )
        if state["step"] > self.total:
            raise CheckpointError(
                f"{path} has already run {state['step']} steps, more than the "
                f"{self.total} this call asks for"
            )
        load_state(self.model, state["model"], "model", path)
        load_state(self.guide, state["guide"], "guide", path)
        try:
            self._restore(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"the training state in {path} does not match: {error}") \
                from error

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        self.opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.batches.load_state_dict(state["batches"])
        self.step = int(state["step"])
        self.history = state["history"].tolist()
        self.seconds = state["step_seconds"].tolist()

    def result(self) -> FitResult:
        return FitResult(history=np.array(self.history), step_seconds=np.array(self.seconds),
                         num_steps=self.step)
