"""Approximation and amortization gaps: why an encoder's ELBO falls short of log p(x).

For each datapoint x_n let q(z | x_n) be the encoder's distribution and q*_n the best
member of the same family for x_n alone, found by fitting a local guide with the model
frozen. The encoder's shortfall splits in two (Cremer, Li & Duvenaud, 2018):

    log p(x) - L[q]  =  (log p(x) - L[q*])  +  (L[q*] - L[q])
    inference gap       approximation gap      amortization gap

The approximation gap is KL(q* || p(z | x)): the family cannot represent the posterior.
The amortization gap is what one shared network loses against per-datapoint fits.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vae.guides.local import (
    FAMILIES,
    LOCAL_GUIDES,
    LocalMVN,
    LocalNormal,
    encoder_distribution,
    family_of,
)
from ppl_vae.estimators import _mean_se, check_structure, log_weights, pareto_khat
from ppl_vae.train import FitResult, fit
from ppl_vae.validation import as_data, one_of, positive_int

# Per-datapoint quantities of a GapReport, each with a standard error "<name>_se".
QUANTITIES = (
    "log_px",
    "elbo_local",
    "elbo_amortized",
    "approximation_gap",
    "amortization_gap",
    "inference_gap",
)

# The learning rate is divided by LR_DECAY at each plateau, LR_DECAYS times, before a
# plateau stops the fit: at a constant rate Adam hovers around each datapoint's optimum
# at a distance set by the rate and the gradient noise, and smaller rates let it settle
# (on a 2-d PPCA posterior the mean excess KL falls from ~0.04 nats at a constant 3e-2
# to ~0.001).
# Above this mean PSIS k-hat an importance-sampled log p(x) is not to be trusted.
KHAT_RELIABLE = 0.7

LR_DECAY = 3.0
LR_DECAYS = 4


def fit_local(
    model,
    x,
    family: str = "diag",
    *,
    init_from=None,
    steps: int = 3000,
    lr: float = 3e-2,
    num_particles: int = 8,
    batch_size: int | None = None,
    tol: float = 1e-3,
    window: int = 50,
    progress: bool = True,
    seed: int | None = None,
) -> LocalNormal | LocalMVN:
    """Fit a local guide, one Gaussian per datapoint, with the model's parameters frozen.

    All datapoints are fitted at once: the guide holds one parameter tensor of shape
    (N, ...), and since the ELBO is a sum over datapoints whose terms share no
    parameter, and Adam scales every parameter's step separately, one vectorized fit
    behaves like N independent ones. Gradients average ``num_particles`` samples
    (vectorized ``Trace_ELBO``).

    Convergence: every ``window`` steps the mean ELBO of the last window is compared
    with that of the window before; when it rose by less than ``tol`` nats per
    datapoint (a plateau), the learning rate is divided by ``LR_DECAY`` (3), and at
    the fifth plateau (or after ``steps`` steps) fitting stops.

    Parameters
    ----------
    model : PyroModule
        Its parameters are left bit-for-bit unchanged.
    x : Tensor or ndarray of shape (N, D)
    family : {"diag", "full"}
        :class:`~ppl_vae.guides.LocalNormal` (diagonal covariance) or :class:`~ppl_vae.guides.LocalMVN`.
    init_from : amortized guide, optional
        Start row n at ``init_from``'s q(z | x_n); by default every row starts at the
        prior N(0, I) (which needs ``model.latent_dim``).
    steps : int
        Most optimizer steps.
    lr : float
        Initial Adam learning rate.
    num_particles : int
        Samples per datapoint in each gradient estimate.
    batch_size : int, optional
        Rows per step; all rows when None (recommended: Adam's momentum keeps moving
        the rows that a minibatch leaves out).
    tol, window : float, int
        The plateau rule above.
    progress : bool
        Show a progress bar.
    seed : int, optional
        Seeds the fit.

    Returns
    -------
    LocalNormal or LocalMVN with parameters of shape (N, ...).
    """
    x = as_data(x, model)
    check_structure(model, x[:1])
    return _fit_local(
        model, x, family, init_from=init_from, steps=steps, lr=lr,
        num_particles=num_particles, batch_size=batch_size, tol=tol, window=window,
        progress=progress, seed=seed,
    )[0]


@dataclass(frozen=True)
class GapReport:
    """The inference gap of an encoder, split into approximation and amortization gaps.

    The float attributes are means over datapoints, in nats per datapoint, each with
    its standard error ``<name>_se`` (Monte Carlo noise and the spread over
    datapoints). ``per_datapoint`` holds Tensors of shape (N,) under the same names
    (``"approximation_gap"``, ``"approximation_gap_se"``, ...) and ``"khat"``.

    Attributes
    ----------
    log_px : float
        log p(x): exact when the model has ``marginal()``, else importance sampled with
        the fitted local guide as the proposal (see ``log_px_method``).
    elbo_local : float
        L[q*], the ELBO of the fitted local guide.
    elbo_amortized : float
        L[q], the ELBO of the encoder.
    approximation_gap : float
        log p(x) - L[q*].
    amortization_gap : float
        L[q*] - L[q].
    inference_gap : float
        log p(x) - L[q], the sum of the two.
    khat_mean, khat_max : float
        PSIS k-hat of the local guide's importance weights (the proposal of an
        importance-sampled log p(x)); above 0.7 that estimate is unreliable.
    log_px_method : {"exact", "importance"}
    local_family : {"diag", "full"}
    num_samples : int
        K, samples per datapoint of every estimate (both ELBOs and log p(x)).
    num_data : int
    local_steps : int
        Optimizer steps the local fit ran.
    per_datapoint : dict of str to Tensor of shape (N,)
    """

    log_px: float
    log_px_se: float
    elbo_local: float
    elbo_local_se: float
    elbo_amortized: float
    elbo_amortized_se: float
    approximation_gap: float
    approximation_gap_se: float
    amortization_gap: float
    amortization_gap_se: float
    inference_gap: float
    inference_gap_se: float
    khat_mean: float
    khat_max: float
    log_px_method: str
    local_family: str
    num_samples: int
    num_data: int
    local_steps: int
    per_datapoint: dict[str, Tensor] = field(repr=False, compare=False)

    @classmethod
    def from_per_datapoint(cls, per_datapoint: dict[str, Tensor], **info) -> GapReport:
        """Means and their standard errors from per-datapoint values.

        ``info`` gives the remaining attributes (``log_px_method``, ``local_family``,
        ``num_samples``, ``local_steps``).
        """
        means = {}
        for name in QUANTITIES:
            values, se = per_datapoint[name], per_datapoint[name + "_se"]
            means[name] = float(values.mean())
            means[name + "_se"] = _mean_se(values, se)
        khat = per_datapoint["khat"]
        return cls(
            **means,
            khat_mean=float(khat.nan_to_num().mean()),
            khat_max=float(khat.nan_to_num().max()),
            num_data=len(khat),
            per_datapoint=dict(per_datapoint),
            **info,
        )

    def to_dict(self, *, per_datapoint: bool = True) -> dict:
        """Plain Python values (JSON-safe); per-datapoint tensors become lists."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_datapoint"}
        if per_datapoint:
            out["per_datapoint"] = {k: v.tolist() for k, v in self.per_datapoint.items()}
        return out

    def to_json(self, *, per_datapoint: bool = True, **kwargs) -> str:
        """:meth:`to_dict` as JSON; ``kwargs`` go to ``json.dumps`` (e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(per_datapoint=per_datapoint), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> GapReport:
        """Inverse of :meth:`to_dict` (per-datapoint values come back as float64)."""
        data = dict(data)
        per = data.pop("per_datapoint", {})
        per = {k: torch.tensor(v, dtype=torch.float64) for k, v in per.items()}
        return cls(**data, per_datapoint=per)

    @classmethod
    def from_json(cls, text: str) -> GapReport:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def plot(self, ax=None):
        """Stacked bar of the two gaps; see :func:`ppl_vae.plots.plot_gaps`."""
        from ppl_vae.plots import plot_gaps

        return plot_gaps(self, ax=ax)

    def __str__(self) -> str:
        rows = [
            ("log p(x)", "log_px"),
            ("L[q*]  local ELBO", "elbo_local"),
            ("L[q]   amortized ELBO", "elbo_amortized"),
            ("approximation gap  log p(x) - L[q*]", "approximation_gap"),
            ("amortization gap   L[q*] - L[q]", "amortization_gap"),
            ("inference gap      log p(x) - L[q]", "inference_gap"),
        ]
        width = max(len(label) for label, _ in rows)
        lines = [
            f"GapReport: {self.num_data} datapoints, local family {self.local_family!r}, "
            f"K={self.num_samples}, log p(x) {self.log_px_method}, "
            f"{self.local_steps} local steps",
            f"  {'':{width}}  {'mean (nats)':>12}  {'se':>9}",
        ]
        for label, name in rows:
            mean, se = getattr(self, name), getattr(self, name + "_se")
            lines.append(f"  {label:{width}}  {mean:12.4f}  {se:9.4f}")
        lines.append(
            f"  PSIS k-hat of the local proposal: mean {self.khat_mean:.2f}, "
            f"max {self.khat_max:.2f}"
        )
        return "\n".join(lines)


def gaps(
    model,
    guide,
    x,
    *,
    local: str | None = None,
    num_samples: int = 5000,
    local_steps: int = 3000,
    local_lr: float = 3e-2,
    local_particles: int = 8,
    match_family: bool = True,
    seed: int | None = None,
    progress: bool = True,
) -> GapReport:
    """Split the encoder's inference gap into approximation and amortization gaps.

    Fits a local guide of the encoder's family (one vectorized fit, started at the
    encoder's output so that L[q*] >= L[q] up to noise), then estimates per datapoint
    log p(x), L[q*] and L[q] from K samples each.

    Both ELBOs use the same random draws (common random numbers: with
    reparameterized Gaussians, z = m + L eps with the same eps), so their difference,
    the amortization gap, is estimated far more precisely than either ELBO; every
    standard error is computed from the paired samples, so it stays honest.

    Parameters
    ----------
    model, guide : PyroModule
        ``guide`` is an amortized Gaussian encoder (``distribution(x)`` returning an
        Independent Normal or a MultivariateNormal).
    x : Tensor or ndarray of shape (N, D)
    local : {"diag", "full"}, optional
        Family of the local guide; by default the encoder's. The decomposition needs
        the two to match: a diagonal encoder against a full-covariance q* would count
        the family's shortfall as an amortization gap.
    num_samples : int
        K, samples per datapoint for each estimate.
    local_steps, local_lr, local_particles : optional
        ``steps``, ``lr`` and ``num_particles`` of :func:`fit_local`.
    match_family : bool
        False allows ``local`` to differ from the encoder's family.
    seed : int, optional
        Seeds the local fit and the estimates.
    progress : bool
        Show the local fit's progress bar.

    Returns
    -------
    GapReport

    Raises
    ------
    ValueError
        On bad input, on a non-Gaussian encoder, or when ``local`` does not match the
        encoder's family (unless ``match_family=False``).
    """
    x = as_data(x, model)
    check_structure(model, x[:1])
    num_samples = positive_int(num_samples, "num_samples")
    positive_int(local_steps, "local_steps")
    positive_int(local_particles, "local_particles")
    family = _local_family(guide, x, local, match_family)
    local_guide, fitted = _fit_local(
        model, x, family, init_from=guide, steps=local_steps, lr=local_lr,
        num_particles=local_particles, progress=progress, seed=seed,
    )
    eval_seed = _eval_seed(seed)
    lw_local = log_weights(model, local_guide, x, num_samples, seed=eval_seed)
    lw_amortized = log_weights(model, guide, x, num_samples, seed=eval_seed)
    log_px, px_influence, method = _log_px(model, x, lw_local)
    per = _per_datapoint(log_px, px_influence, lw_local, lw_amortized)
    report = GapReport.from_per_datapoint(
        per, log_px_method=method, local_family=family, num_samples=num_samples,
        local_steps=fitted.num_steps,
    )
    if method == "importance" and report.khat_mean > KHAT_RELIABLE:
        warnings.warn(
            f"mean PSIS k-hat of the log p(x) proposal is {report.khat_mean:.2f} > "
            f"{KHAT_RELIABLE}: log p(x) and the approximation gap are unreliable here "
            "(likely too low); more samples or a heavier-tailed proposal are needed",
            stacklevel=2,
        )
    return report


@dataclass(frozen=True)
class RefinementCurve:
    """The mean ELBO of a local guide started at the encoder, along SVI steps.

    Attributes
    ----------
    steps : ndarray of int, shape (T,)
        Steps taken when each ELBO was measured; ``steps[0] == 0`` is the encoder.
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
) -> RefinementCurve:
    """Semi-amortized inference: refine the encoder's output by SVI steps per datapoint.

    A local guide of the encoder's family starts at q(z | x_n) for every datapoint and
    takes ``steps`` Adam steps on the ELBO with the model frozen (one vectorized fit).
    The mean ELBO is measured at step 0 and every ``eval_every`` steps.

    Parameters
    ----------
    model, guide : PyroModule
        ``guide`` is an amortized Gaussian encoder.
    x : Tensor or ndarray of shape (N, D)
    steps : int
        SVI steps in all.
    lr, num_particles : optional
        Adam's learning rate (constant), and samples per gradient estimate.
    eval_every : int, optional
        Steps between measurements; ``steps // 20`` (at least 1) by default.
    num_samples : int
        K, samples per datapoint of each ELBO measurement.
    target_elbo : float, optional
        Stored in the curve, to express progress as a fraction of the gap closed.
    seed : int, optional
    progress : bool

    Returns
    -------
    RefinementCurve
    """
    x = as_data(x, model)
    check_structure(model, x[:1])
    steps = positive_int(steps, "steps")
    num_samples = positive_int(num_samples, "num_samples")
    eval_every = max(1, steps // 20) if eval_every is None else eval_every
    eval_every = positive_int(eval_every, "eval_every")
    local = LOCAL_GUIDES[_local_family(guide, x, None, True)].from_encoder(guide, x)
    if seed is not None:
        pyro.set_rng_seed(seed)
    eval_seed = _eval_seed(seed)
    optimizer = torch.optim.Adam(local.parameters(), lr=lr)
    loss = _particle_elbo(num_particles)
    done, record = 0, [(0, *_mean_elbo(model, local, x, num_samples, eval_seed))]
    with tqdm(total=steps, disable=not progress, desc="refine", unit="step") as bar:
        while done < steps:
            n = min(eval_every, steps - done)
            # The same optimizer each time: Adam's moments carry over between segments.
            fit(model, local, x, num_steps=n, optimizer=lambda _: optimizer, loss=loss,
                train_model=False, progress=False)
            done += n
            record.append((done, *_mean_elbo(model, local, x, num_samples, eval_seed)))
            bar.update(n)
    steps_, elbo_, se_ = (np.array(column) for column in zip(*record, strict=True))
    return RefinementCurve(steps=steps_, elbo=elbo_, elbo_se=se_, target_elbo=target_elbo)


def _fit_local(model, x, family, *, init_from, steps, lr, num_particles, batch_size=None,
               tol=1e-3, window=50, progress=True, seed=None) -> tuple:
    """The fit behind fit_local and gaps, on data they have already checked."""
    one_of(family, FAMILIES, "family")
    steps = positive_int(steps, "steps")
    schedule = _Plateau(lr, tol=tol, window=positive_int(window, "window"))
    guide = _initial_local(model, x, family, init_from)
    result: FitResult = fit(
        model, guide, x, num_steps=steps, batch_size=batch_size,
        optimizer=schedule.optimizer, loss=_particle_elbo(num_particles), seed=seed,
        progress=progress, train_model=False, callback=schedule,
    )
    return guide, result


def _initial_local(model, x, family, init_from):
    cls = LOCAL_GUIDES[family]
    if init_from is not None:
        return cls.from_encoder(init_from, x)
    latent_dim = getattr(model, "latent_dim", None)
    if latent_dim is None:
        raise ValueError(
            f"{type(model).__name__} has no latent_dim: pass init_from=an encoder to size "
            "the local guide"
        )
    return cls(len(x), latent_dim).to(x)


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
        self._optimizer = torch.optim.Adam(params, lr=self.lr)
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


def _local_family(guide, x, local, match_family) -> str:
    family = family_of(encoder_distribution(guide, x[:1]))
    if local is None:
        return family
    one_of(local, FAMILIES, "local")
    if local != family and match_family:
        raise ValueError(
            f"local={local!r} but {type(guide).__name__} is a {family!r} Gaussian: the "
            "amortization gap L[q*] - L[q] means what amortization costs only when q* is "
            "the best member of the encoder's own family (otherwise it mixes in the "
            f"difference between families); use local={family!r}, or match_family=False "
            "to compare across families on purpose"
        )
    return local


def _eval_seed(seed: int | None) -> int:
    if seed is not None:
        return seed + 1
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _log_px(model, x, lw_local) -> tuple[Tensor, Tensor, str]:
    """log p(x) per datapoint and its per-sample influence [K, N] (for paired errors)."""
    marginal = getattr(model, "marginal", None)
    if callable(marginal):
        with torch.no_grad():
            exact = marginal().log_prob(x).to(lw_local)
        return exact, torch.zeros_like(lw_local), "exact"
    log_px = torch.logsumexp(lw_local, 0) - math.log(len(lw_local))
    # Delta method: log mean(w) moves by (w_k / mean(w) - 1) / K per sample.
    return log_px, (lw_local - log_px).exp(), "importance"


def _per_datapoint(log_px, px_influence, lw_local, lw_amortized) -> dict[str, Tensor]:
    """Estimates and paired standard errors from the [K, N] weights of one draw of eps."""
    elbo_local, elbo_amortized = lw_local.mean(0), lw_amortized.mean(0)
    estimates = {
        "log_px": (log_px, px_influence),
        "elbo_local": (elbo_local, lw_local),
        "elbo_amortized": (elbo_amortized, lw_amortized),
        "approximation_gap": (log_px - elbo_local, px_influence - lw_local),
        "amortization_gap": (elbo_local - elbo_amortized, lw_local - lw_amortized),
        "inference_gap": (log_px - elbo_amortized, px_influence - lw_amortized),
    }
    k = len(lw_local)
    out = {}
    for name, (value, influence) in estimates.items():
        out[name] = value
        out[name + "_se"] = influence.std(0) / math.sqrt(k) if k > 1 else value * math.nan
    out["khat"] = pareto_khat(lw_local)
    return out


def _mean_elbo(model, guide, x, num_samples, seed) -> tuple[float, float]:
    """Mean ELBO and its Monte Carlo standard error (a seeded log_weights call leaves
    the global RNG untouched)."""
    lw = log_weights(model, guide, x, num_samples, seed=seed)
    per_point = lw.mean(0)
    se = lw.std(0) / math.sqrt(num_samples) if num_samples > 1 else torch.zeros_like(per_point)
    return float(per_point.mean()), float(se.square().sum().sqrt()) / len(per_point)
