"""Semi-amortized inference: an encoder's output refined by SVI steps per datapoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from ppl_vae.distributed import local_only
from ppl_vae.estimators import (
    log_weights,
)
from ppl_vae.gaps import evaluation_seed
from ppl_vae.local_fit import initial_local, local_family
from ppl_vae.objectives import make_optimizer
from ppl_vae.programs import as_programs, required_guide
from ppl_vae.row_convergence import (
    LR_DECAY,
    LR_DECAYS,
)
from ppl_vae.settings import module_local
from ppl_vae.structure import check_structure
from ppl_vae.train import fit
from ppl_vae.validation import as_data, positive_int


@dataclass(frozen=True)
class RefinementCurve:
    """The mean ELBO of a local guide started at the encoder, along SVI steps.

    Attributes
    ----------
    steps : ndarray of int, shape (T,)
        Steps taken when each ELBO was measured; ``steps[0] == 0`` is the starting local
        guide: the encoder itself for a Gaussian encoder of one site; for any other
        guide its moment match (from 64 draws per row), whose ELBO differs from the
        encoder's own (``ppl_vae.elbo``), so ``gap_closed`` counts from that start.
    elbo, elbo_se : ndarray of shape (T,)
        Mean ELBO per datapoint and its Monte Carlo standard error (the datapoints held
        fixed; every measurement uses the same random draws, so the curve's changes are
        measured more precisely than its level).
    target_elbo : float, optional
        A reference ELBO, typically ``GapReport.elbo_local`` (L[q*]).
    """

    steps: np.ndarray
    elbo: np.ndarray
    elbo_se: np.ndarray
    target_elbo: float | None = None

    @property
    def gap_closed(self) -> np.ndarray | None:
        """Fraction of the amortization gap ``target_elbo - elbo[0]`` closed at each step."""
        if self.target_elbo is None:
            return None
        return (self.elbo - self.elbo[0]) / (self.target_elbo - self.elbo[0])

    def to_dict(self) -> dict:
        """Plain Python values (JSON-safe)."""
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(self).items()}

    def plot(self, ax=None):
        """The curve; see :func:`ppl_vae.plots.plot_refinement`."""
        from ppl_vae.plots import plot_refinement

        return plot_refinement(self, ax=ax)


@module_local
def refine(
    model,
    guide,
    x,
    steps: int,
    *,
    lr: float = 3e-2,
    num_particles: int = 8,
    eval_every: int | None = None,
    num_samples: int = 100,
    target_elbo: float | None = None,
    seed: int | None = None,
    progress: bool = True,
    tol: float | None = 1e-3,
    window: int = 25,
    local: str | None = None,
    plate: str | None = None,
) -> RefinementCurve:
    """Semi-amortized inference: refine the encoder's output by SVI steps per datapoint.

    A local guide of the encoder's family starts at q(z | x_n) and takes Adam steps on
    the ELBO, model frozen; the learning rate follows a plateau rule (:doc:`gaps`).

    Parameters
    ----------
    model, guide : Pyro programs
        ``guide`` is an amortized guide; a Gaussian encoder of one site is copied
        exactly, any other starts each row at the moments of its draws.
    x : Tensor or ndarray of shape (N, D)
    steps : int
        SVI steps in all.
    lr, num_particles, tol, window : optional
        Adam's initial rate, samples per gradient, the plateau rule (None: constant lr).
    eval_every, num_samples : optional
        Steps between ELBO measurements (``steps // 20`` by default), K per datapoint.
    target_elbo : float, optional
        Stored in the curve, to express progress as a fraction of the gap closed.
    seed, progress, local, plate : optional
        The seed, a progress bar, the local family and the data plate (as for ``gaps``).

    Returns
    -------
    RefinementCurve
    """
    required_guide(guide)
    x = as_data(x, model)
    model, guide = as_programs(model, guide, x, plate=plate)
    space = check_structure(model, x, unconstrained=True)
    steps = positive_int(steps, "steps")
    schedule = None if tol is None else _Plateau(lr, tol=tol, window=positive_int(window, "window"))
    num_samples = positive_int(num_samples, "num_samples")
    eval_every = max(1, steps // 20) if eval_every is None else eval_every
    eval_every = positive_int(eval_every, "eval_every")
    local = initial_local(model, x, local_family(guide, x, local, True), guide, seed=seed,
                          space=space)
    if seed is not None:
        pyro.set_rng_seed(seed)
    eval_seed = evaluation_seed(seed)
    params = list(local.parameters())
    optimizer = schedule.optimizer(params) if schedule else make_optimizer(None, params, lr)
    loss = _particle_elbo(num_particles)
    done, record = 0, [(0, *_mean_elbo(model, local, x, num_samples, eval_seed))]
    with tqdm(total=steps, disable=not progress, desc="refine", unit="step") as bar:
        while done < steps:
            n = min(eval_every, steps - done)
            # The same optimizer each time: Adam's moments carry over between segments.
            with local_only():
                fit(model, local, x, num_steps=n, optimizer=lambda _: optimizer, loss=loss,
                    train_model=False, progress=False, callback=_decay_only(schedule))
            done += n
            record.append((done, *_mean_elbo(model, local, x, num_samples, eval_seed)))
            bar.update(n)
    steps_, elbo_, se_ = (np.array(column) for column in zip(*record, strict=True))
    return RefinementCurve(steps=steps_, elbo=elbo_, elbo_se=se_, target_elbo=target_elbo)


def _decay_only(schedule):
    """``schedule`` as a callback that decays the rate but never stops the fit."""
    if schedule is None:
        return None
    return lambda step, elbo: schedule(step, elbo) and False


def _particle_elbo(num_particles: int) -> Trace_ELBO:
    return Trace_ELBO(
        num_particles=positive_int(num_particles, "num_particles"),
        vectorize_particles=True,
        max_plate_nesting=1,
    )


class _Plateau:
    """fit()'s callback: decay Adam's learning rate at each plateau, stop at the last.

    A plateau: the mean ELBO of the last ``window`` steps exceeds that of the window
    before by less than ``tol``. Windows restart after each decay.
    """

    def __init__(self, lr: float, *, tol: float, window: int):
        self.lr, self.tol, self.window = lr, tol, window
        self.decays_left = LR_DECAYS
        self.history: list[float] = []
        self.since = 0  # index of the first step at the current rate
        self._optimizer = None

    def optimizer(self, params) -> torch.optim.Optimizer:
        self._optimizer = make_optimizer(None, params, self.lr)  # fit's default Adam
        return self._optimizer

    def __call__(self, step: int, elbo: float) -> bool:
        self.history.append(elbo)
        n, w = len(self.history) - self.since, self.window
        if n < 2 * w or n % w:
            return False
        recent = self.history[-w:]
        before = self.history[-2 * w : -w]
        if sum(recent) / w - sum(before) / w >= self.tol:
            return False
        if self.decays_left == 0:
            return True
        self.decays_left -= 1
        for group in self._optimizer.param_groups:
            group["lr"] /= LR_DECAY
        self.since = len(self.history)
        return False


def _mean_elbo(model, guide, x, num_samples, seed) -> tuple[float, float]:
    """Mean ELBO and its Monte Carlo standard error (a seeded log_weights call leaves
    the global RNG untouched)."""
    lw = log_weights(model, guide, x, num_samples, seed=seed)
    per_point = lw.mean(0)
    se = lw.std(0) / math.sqrt(num_samples) if num_samples > 1 else torch.zeros_like(per_point)
    return float(per_point.mean()), float(se.square().sum().sqrt()) / len(per_point)
