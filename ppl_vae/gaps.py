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
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vae import json_output
from ppl_vae.ais import ais_trusted
from ppl_vae.distributed import local_only, summed_over_group
from ppl_vae.estimators import (
    log_weights,
    log_weights_trusted,
    mean_se,
    pareto_khat,
)
from ppl_vae.guides.latent_space import LatentSpace, is_latent_site
from ppl_vae.guides.local import (
    FAMILIES,
    LOCAL_GUIDES,
    LocalDiag,
    LocalFlow,
    LocalFull,
    family_of,
)
from ppl_vae.local_elbo import LocalELBO, gather_rows, owned_rows
from ppl_vae.local_fit import (
    EVAL_STREAM,
    INIT_STREAM,
    LR_DECAY,
    LR_DECAYS,
    Noised,
    RowPlateau,
    row_noise,
)
from ppl_vae.programs import as_programs
from ppl_vae.seeding import ROW_BLOCK, base_seed, blocks, caller_rng_kept, check_seed, seed_torch
from ppl_vae.settings import module_local
from ppl_vae.structure import check_guide, check_structure, described
from ppl_vae.train import FitResult, fit, fit_trusted
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

# Above this mean PSIS k-hat an importance-sampled log p(x) is not to be trusted.
KHAT_RELIABLE = 0.7


@module_local
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
    plate: str | None = None,
) -> LocalDiag | LocalFull | LocalFlow:
    """Fit a local guide, one q_n per datapoint, with the model's parameters frozen.

    The guide covers every latent site of the model's ``"data"`` plate, whatever their
    names, event shapes and supports: it is a density over their joint unconstrained
    vector u in R^d (see :class:`~ppl_vae.guides.latent_space.LatentSpace`), and the
    log-Jacobian of each site's ``biject_to`` enters its log-density, so the ELBO is
    that of the constrained latents.

    All datapoints are fitted at once: the guide holds one parameter tensor of shape
    (N, ...), and since the ELBO is a sum over datapoints whose terms share no
    parameter, and Adam scales every parameter's step separately, one vectorized fit
    behaves like N independent ones. Gradients average ``num_particles`` samples
    (vectorized ``Trace_ELBO``).

    Under torch.distributed each rank fits every world_size-th row and the rows are
    gathered at the end (:mod:`ppl_vae.local_elbo`): the same guide as one process, up
    to float rounding.

    Convergence is each row's own (:mod:`ppl_vae.local_fit`), so a row's q*_n is the
    same whatever rows are fitted with it (with a seed, up to float rounding): row n's
    random draws depend only on (seed, n, step); every row has its own Adam learning
    rate; ``MEASURES`` (5) times per ``window`` steps each row's ELBO is measured on
    fixed draws, and when its window average has not beaten its best by ``tol`` nats
    for ``PATIENCE`` (5) windows running (a plateau), that row's rate is divided by
    ``LR_DECAY`` (3); at its plateau after ``LR_DECAYS`` (4) decays the row stops, its
    parameters frozen. The fit ends when every row has stopped, or after ``steps``.
    With ``batch_size`` below N the minibatches, drawn from all rows, make rows
    depend on each other again.

    Parameters
    ----------
    model : PyroModule
        Its parameters are left bit-for-bit unchanged.
    x : Tensor or ndarray of shape (N, D)
    family : {"diag", "full", "flow"}
        :class:`~ppl_vae.guides.LocalDiag` (diagonal Gaussian over u),
        :class:`~ppl_vae.guides.LocalFull` (full-covariance Gaussian over all sites
        jointly) or :class:`~ppl_vae.guides.LocalFlow` (a per-datapoint flow that
        contains ``"full"``).
    init_from : guide, optional
        Where each row starts. A Gaussian encoder (``distribution(x)`` an Independent
        Normal or MultivariateNormal) of a model with one real latent site is copied:
        exactly into ``"full"`` and ``"flow"`` (its layers at the identity), and its
        marginal variances into ``"diag"``. Any other guide (a flow encoder, a guide of
        several sites or of constrained ones, a user's own) starts row n at the mean
        and covariance of ``MOMENT_SAMPLES`` of its draws of u for x_n. By default,
        every row starts at the prior's moments over u, from ``PRIOR_SAMPLES`` draws
        of the model's latents on one datapoint.
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
        The per-row plateau rule above.
    progress : bool
        Show a progress bar.
    seed : int, optional
        Seeds the fit.

    Returns
    -------
    LocalDiag, LocalFull or LocalFlow, with parameters of shape (N, ...).

    Raises
    ------
    ValueError
        On bad input or an unknown ``family``, before any work.

    Examples
    --------
    The full-covariance family holds PPCA's exact posterior, so q* reaches log p(x):

    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(16, 2) @ torch.randn(2, 5) + torch.randn(16, 5)
    >>> model = PPCA.from_data(x, latent_dim=2)
    >>> q = ppl_vae.fit_local(model, x, "full", steps=300, seed=0, progress=False)
    >>> gap = model.score_samples(x) - ppl_vae.elbo(model, q, x, num_samples=100, seed=0)
    >>> bool(gap.mean().abs() < 0.02)
    True
    """
    x = as_data(x, model)
    model, init_from = as_programs(model, init_from, x, plate=plate)
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
    log_px_method : {"exact", "importance", "ais"}
    log_px_settings : dict
        The AIS settings (``num_steps``, ``num_chains``) when ``log_px_method`` is "ais".
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
    log_px_settings: dict = field(default_factory=dict)

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
            means[name + "_se"] = mean_se(values, se)
        khat = per_datapoint["khat"]
        return cls(
            **means,
            # NaN (one sample) carries no information; inf (too few samples for a tail
            # fit) is arviz's way of saying "do not trust", and stays inf.
            khat_mean=_mean_or_nan(khat[~khat.isnan()]),
            khat_max=float(khat[~khat.isnan()].max()) if (~khat.isnan()).any() else math.nan,
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
        """:meth:`to_dict` as strict JSON: NaN and +-inf (say, k-hat of too few samples)
        are ``null``. ``kwargs`` go to ``json.dumps`` (e.g. ``indent=2``)."""
        return json_output.dumps(self.to_dict(per_datapoint=per_datapoint), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> GapReport:
        """Inverse of :meth:`to_dict` (per-datapoint values come back as float64); a
        number that JSON holds as ``null`` (not finite) comes back as NaN."""
        data = dict(data)
        per = data.pop("per_datapoint", {})
        per = {k: torch.tensor([math.nan if e is None else e for e in v], dtype=torch.float64)
               for k, v in per.items()}
        numbers = {f.name for f in fields(cls) if f.type in ("float", float)}
        data.update({k: math.nan for k in numbers if k in data and data[k] is None})
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
            f"K={self.num_samples}, log p(x) {self.log_px_method}"
            f"{_settings_text(self.log_px_settings)}, "
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


@module_local
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
    log_px: str = "auto",
    ais_steps: int = 100,
    ais_chains: int = 16,
    seed: int | None = None,
    progress: bool = True,
    plate: str | None = None,
) -> GapReport:
    """Split the encoder's inference gap into approximation and amortization gaps.

    Fits a local guide of the encoder's family over every latent site of the model
    (one vectorized fit, started from the encoder so that L[q*] >= L[q] up to noise
    where the encoder can be copied), then estimates per datapoint log p(x), L[q*]
    and L[q] from K samples each.

    Both ELBOs use the same random draws (common random numbers: with
    reparameterized Gaussians, z = m + L eps with the same eps), so their difference,
    the amortization gap, is estimated far more precisely than either ELBO; every
    standard error is computed from the paired samples, so it stays honest.

    Where the local fit starts (see :func:`fit_local`, ``init_from``): a Gaussian
    encoder of a single real latent site is copied, exactly for ``"full"`` and
    ``"flow"`` (its nonlinear layers at the identity) and in its marginal variances
    for ``"diag"``. Any other encoder (a flow encoder, several sites, constrained
    supports, a user's own guide) starts each row at the mean and covariance of 64 of
    the encoder's draws of the unconstrained latents for that datapoint. (For a flow
    encoder that is closer to q than its Gaussian base, which its conditional layers
    may have moved and reshaped; the local flow cannot copy those layers.)

    Parameters
    ----------
    model, guide : PyroModule
        ``guide`` is an amortized encoder of any family; it must have a site for each
        of the model's latents and a density (no point mass).
    x : Tensor or ndarray of shape (N, D)
    local : {"diag", "full", "flow"}, optional
        Family of the local guide; by default the encoder's, read from its ``family``
        attribute, or else from its trace (a single Normal site is ``"diag"``, a
        MultivariateNormal ``"full"``). A guide whose family cannot be read (several
        sites, a user's own guide) needs ``local``. The decomposition needs the two
        to match: a diagonal encoder against a full-covariance q* would count the
        family's shortfall as an amortization gap.
    num_samples : int
        K, samples per datapoint for each estimate.
    local_steps, local_lr, local_particles : optional
        ``steps``, ``lr`` and ``num_particles`` of :func:`fit_local`.
    match_family : bool
        False allows ``local`` to differ from the encoder's family.
    log_px : {"auto", "exact", "is", "ais"}
        How log p(x) is computed. ``"exact"``: the model's closed-form ``marginal()``.
        ``"is"``: importance sampling with the K draws of the fitted local guide.
        ``"ais"``: :func:`ppl_vae.ais` started from the fitted local guide, with
        ``ais_steps`` distributions and ``ais_chains`` chains (its standard error is
        added in quadrature to those of log p(x) and of the gaps that use it).
        ``"auto"``: exact when the model has ``marginal()``, else importance sampling,
        with a warning recommending ``"ais"`` when the mean PSIS k-hat exceeds 0.7.
    ais_steps, ais_chains : int
        ``num_steps`` and ``num_chains`` of AIS for ``log_px="ais"``, started from the
        fitted local guides; the defaults (100 x 16) are chosen for speed (the README's
        AIS section has their accuracy on the digits VAE). Check a budget on your own
        model with :func:`ppl_vae.bdmc` on simulated data.
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
        On bad input, an unknown ``local``, an encoder without a density or without a
        local counterpart (unless ``local`` is given), an encoder whose family cannot be
        read and no ``local``, or when ``local`` does not match the encoder's family
        (unless ``match_family=False``); all before any fitting.

    Examples
    --------
    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA
    >>> from ppl_vae.guides import LinearEncoder
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(16, 2) @ torch.randn(2, 5) + torch.randn(16, 5)
    >>> model, guide = PPCA.from_data(x, latent_dim=2), LinearEncoder(5, 2)
    >>> report = ppl_vae.gaps(model, guide, x, local="diag", local_steps=200, num_samples=200,
    ...                       seed=0, progress=False)
    >>> report.log_px_method  # PPCA has a closed-form log p(x)
    'exact'
    >>> gap_sum = report.approximation_gap + report.amortization_gap
    >>> bool(abs(gap_sum - report.inference_gap) < 1e-6)
    True
    >>> bool(report.amortization_gap > 0)  # an untrained encoder misses the best member
    True
    """
    x = as_data(x, model)
    seed = check_seed(seed)
    model, guide = as_programs(model, guide, x, plate=plate)
    space = check_structure(model, x[:1])
    num_samples = positive_int(num_samples, "num_samples")
    positive_int(local_steps, "local_steps")
    positive_int(local_particles, "local_particles")
    method = _log_px_method(model, log_px)
    if method == "ais":
        positive_int(ais_steps, "ais_steps")
        positive_int(ais_chains, "ais_chains")
    family = _local_family(guide, x, local, match_family)
    # A guide that cannot be a proposal (a point mass, missing sites) is refused before
    # the local fit, not after it.
    check_guide(model, guide, x, torch.arange(len(x), device=x.device), len(x))
    local_guide, fitted = _fit_local(
        model, x, family, init_from=guide, steps=local_steps, lr=local_lr,
        num_particles=local_particles, progress=progress, seed=seed,
    )
    eval_seed = _eval_seed(seed)
    lw_local = log_weights_trusted(model, local_guide, x, num_samples, eval_seed)
    lw_amortized = log_weights_trusted(model, guide, x, num_samples, eval_seed)
    settings = {"num_steps": ais_steps, "num_chains": ais_chains} if method == "ais" else {}
    estimate, px_influence, extra_se = _log_px(model, space, x, lw_local, method, local_guide,
                                               settings, eval_seed, progress)
    per = _per_datapoint(estimate, px_influence, lw_local, lw_amortized)
    for name in ("log_px_se", "approximation_gap_se", "inference_gap_se"):
        per[name] = torch.hypot(per[name], extra_se)
    report = GapReport.from_per_datapoint(
        per, log_px_method=method, local_family=family, num_samples=num_samples,
        local_steps=fitted.num_steps, log_px_settings=settings,
    )
    if method == "importance" and report.khat_mean > KHAT_RELIABLE:
        warnings.warn(
            f"mean PSIS k-hat of the log p(x) proposal is {report.khat_mean:.2f} > "
            f"{KHAT_RELIABLE}: log p(x) and the approximation gap are unreliable here "
            "(likely too low); use log_px='ais' (annealed importance sampling from the "
            "local guides) for a trustworthy log p(x)",
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

    A local guide of the encoder's family starts at q(z | x_n) for every datapoint and
    takes ``steps`` Adam steps on the ELBO with the model frozen (one vectorized fit).
    The mean ELBO is measured at step 0 and every ``eval_every`` steps. The learning
    rate follows :func:`fit_local`'s plateau rule (a large first step, then smaller
    ones where progress stalls): at a constant rate Adam circles each datapoint's
    optimum, and on the digits VAE the curve stalled at about 80% of the amortization
    gap.

    Parameters
    ----------
    model, guide : Pyro programs
        ``guide`` is an amortized guide; a Gaussian encoder of one site is copied
        exactly, any other starts each row at the moments of its draws.
    x : Tensor or ndarray of shape (N, D)
    steps : int
        SVI steps in all.
    lr, num_particles : optional
        Adam's initial learning rate, and samples per gradient estimate.
    eval_every : int, optional
        Steps between measurements; ``steps // 20`` (at least 1) by default.
    num_samples : int
        K, samples per datapoint of each ELBO measurement.
    target_elbo : float, optional
        Stored in the curve, to express progress as a fraction of the gap closed.
    seed : int, optional
    progress : bool
    tol, window : optional
        A plateau: the mean ELBO of the last ``window`` steps beats that of the window
        before by less than ``tol`` nats. The rate is then divided by ``LR_DECAY`` (3),
        at most ``LR_DECAYS`` (4) times, and held; every step still runs.
        ``tol=None`` keeps ``lr`` constant.
    local : {"diag", "full", "flow"}, optional
        The local family, when the guide's own cannot be read (as for :func:`gaps`).
    plate : str, optional
        The model's data plate, when it cannot be told from the model.

    Returns
    -------
    RefinementCurve
    """
    x = as_data(x, model)
    model, guide = as_programs(model, guide, x, plate=plate)
    check_structure(model, x[:1])
    steps = positive_int(steps, "steps")
    schedule = None if tol is None else _Plateau(lr, tol=tol, window=positive_int(window, "window"))
    num_samples = positive_int(num_samples, "num_samples")
    eval_every = max(1, steps // 20) if eval_every is None else eval_every
    eval_every = positive_int(eval_every, "eval_every")
    local = _initial_local(model, x, _local_family(guide, x, local, True), guide, seed=seed)
    if seed is not None:
        pyro.set_rng_seed(seed)
    eval_seed = _eval_seed(seed)
    params = list(local.parameters())
    optimizer = schedule.optimizer(params) if schedule else torch.optim.Adam(params, lr=lr)
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


def _fit_local(model, x, family, *, init_from, steps, lr, num_particles, batch_size=None,
               tol=1e-3, window=50, progress=True, seed=None) -> tuple:
    """The fit behind fit_local and gaps, on data they have already checked (its own
    settings are checked here, once). Every row converges on its own (see
    :mod:`ppl_vae.local_fit`)."""
    one_of(family, FAMILIES, "family")
    steps = positive_int(steps, "steps")
    num_particles = positive_int(num_particles, "num_particles")
    window = positive_int(window, "window")
    seed = base_seed(check_seed(seed))
    batch_size = len(x) if batch_size is None else min(positive_int(batch_size, "batch_size"),
                                                       len(x))
    guide = _initial_local(model, x, family, init_from, seed=seed)
    # Under torch.distributed each rank fits its own rows (see ppl_vae.local_elbo), with
    # fit's own sharding (DDP, minibatch shares) switched off by local_only; a rank
    # stops when the rows of every rank have stopped.
    owned = owned_rows(len(x), x.device)
    loss = LocalELBO(num_particles, guide.space.names, owned)
    shape = (num_particles, guide.latent_dim)

    def noise(step: int) -> Tensor:
        return row_noise(seed, len(x), shape, step, dtype=x.dtype, device=x.device)

    noised = Noised(guide, noise(0))
    measured = Noised(guide, noise(EVAL_STREAM))
    everything = torch.arange(len(x), device=x.device)

    def measure() -> Tensor:
        with torch.no_grad():
            return loss.row_elbo(model, measured, x, everything, len(x))

    schedule = RowPlateau(lr, len(x), tol=tol, window=window, measure=measure,
                          set_step=lambda step: noised.noise.copy_(noise(step)), owned=owned)
    with local_only():
        result: FitResult = fit_trusted(
            model, noised, x, batch_size=batch_size, total=steps,
            optimizer=schedule.optimizer, loss=loss, seed=seed, progress=progress,
            train_model=False, callback=schedule, jit=owned is None,
        )
    gather_rows(guide, owned)
    return guide, result


# Draws of a guide whose mean and covariance start a local guide; the prior, the same
# for every datapoint, is drawn on one datapoint only, so it can afford many more.
MOMENT_SAMPLES = 64
PRIOR_SAMPLES = 4096
# Rows per vectorized moment draw, which bounds its memory.
MOMENT_ROWS = 256


def _initial_local(model, x, family, init_from, *, seed=None):
    """A local guide of ``family`` for every latent of ``model``, at its starting point.

    A Gaussian encoder of a single real site is copied (exactly where the family
    allows); any other guide, and the prior when ``init_from`` is None, gives its
    moments over u (see :func:`fit_local`). Row n's start depends only on (seed, x_n):
    the moments of a guide are drawn per block of rows, and the family's random
    parameters (a flow's coupling weights) are drawn block by block
    (:func:`_row_seeded`).
    """
    space = LatentSpace.of(model, x)
    cls = LOCAL_GUIDES[family]
    seed = base_seed(seed)
    q = None if init_from is None else _copyable_gaussian(init_from, x, space)
    with caller_rng_kept():
        if q is not None:
            loc, tril = _gaussian_parts(q)
        elif init_from is None:
            # The prior does not depend on x_n: one datapoint's draws serve every row.
            seed_torch(seed, MOMENT_SAMPLES)
            loc, tril = _moments(model, x[:1], space, PRIOR_SAMPLES)
            loc, tril = loc.expand(len(x), -1), tril.expand(len(x), -1, -1)
        else:
            loc, tril = _moments(init_from, x, space, seed=seed)
        return _row_seeded(cls, loc, tril, space, seed)


def _gaussian_parts(q) -> tuple[Tensor, Tensor]:
    """Mean (N, d) and Cholesky factor (N, d, d) of a Gaussian ``q`` (see family_of)."""
    if family_of(q) == "full":
        return q.loc.detach(), q.scale_tril.detach()
    return q.mean.detach(), torch.diag_embed(q.stddev.detach())


def _row_seeded(cls, loc: Tensor, tril: Tensor, space: LatentSpace, seed: int):
    """``cls.from_gaussian(loc, tril, space)``, built ``ROW_BLOCK`` rows at a time, each
    block under its own seed, so that the random parameters of a family (a flow's
    coupling weights) of row n depend only on (seed, n), not on how many rows there are."""
    n, parts = len(loc), []
    for block in range(math.ceil(n / ROW_BLOCK)):
        # Always a whole block (the last padded with copies of the last row): the draws
        # of a constructor depend on its number of rows.
        rows = torch.arange(block * ROW_BLOCK, (block + 1) * ROW_BLOCK).clamp(max=n - 1)
        seed_torch(seed, INIT_STREAM, block)
        parts.append(dict(cls.from_gaussian(loc[rows], tril[rows], space).named_parameters()))
    guide = cls.from_gaussian(loc, tril, space)
    with torch.no_grad():
        for name, param in guide.named_parameters():
            param.copy_(torch.cat([part[name] for part in parts])[:n])
    return guide


def _copyable_gaussian(guide, x, space: LatentSpace):
    """The guide's Gaussian q(z | x) when it is exactly a density of u, else None."""
    site = space.sites[0]
    if len(space.sites) > 1 or not site.is_real or site.event_shape != (space.dim,):
        return None
    if not callable(getattr(guide, "distribution", None)):
        return None
    with torch.no_grad():
        q = guide.distribution(x)
    try:
        family_of(q)
    except ValueError:
        return None
    if tuple(q.batch_shape) != (len(x),) or tuple(q.event_shape) != (space.dim,):
        return None
    return q


def _moments(fn, x, space: LatentSpace, num_samples: int = MOMENT_SAMPLES, *,
             seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Mean (N, d) and Cholesky factor (N, d, d) of ``fn``'s draws of u, row by row.

    ``fn`` is a guide, or the model (whose latents are then drawn from the prior). With
    a ``seed``, the rows are drawn in padded blocks of ``ROW_BLOCK``, each seeded by
    (seed, block), so row n's moments depend only on (seed, x_n); without one, in
    chunks of ``MOMENT_ROWS`` from the global generator.
    """
    idx = torch.arange(len(x), device=x.device)
    if seed is None:
        chunks = [(rows, slice(None)) for rows in torch.split(idx, MOMENT_ROWS)]
    else:
        chunks = [(block.rows.to(x.device), block.real.to(x.device), block.number)
                  for block in blocks(idx)]
    locs = torch.empty(len(x), space.dim, dtype=x.dtype, device=x.device)
    trils = torch.empty(len(x), space.dim, space.dim, dtype=x.dtype, device=x.device)
    with torch.no_grad(), pyro.validation_enabled(False):
        for rows, real, *number in chunks:
            if number:
                seed_torch(seed, INIT_STREAM + 1, number[0])
            u = _draws_of_u(fn, x, rows, space, num_samples)
            loc, tril = _gaussian_fit(u)
            locs[rows[real]], trils[rows[real]] = loc[real], tril[real]
    return locs, trils


def _draws_of_u(fn, x, rows, space: LatentSpace, num_samples: int) -> Tensor:
    """``num_samples`` draws of u for the rows ``rows`` of x, shape (S, B, d)."""
    with pyro.plate("particles", num_samples, dim=-2):
        trace = poutine.trace(fn).get_trace(x[rows], rows, len(x))
    missing = [name for name in space.names if name not in trace.nodes]
    if missing:
        raise ValueError(
            f"{type(fn).__name__} has no site for the model's latents {missing}: "
            "it cannot start a local guide"
        )
    u = space.flatten({name: trace.nodes[name]["value"] for name in space.names})
    return u.expand(num_samples, len(rows), space.dim)


def _gaussian_fit(u: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and Cholesky factor of draws u (S, B, d), per row, ignoring non-finite draws.

    (A Normal guide on a positive latent puts draws outside the support: their u is
    NaN.) The covariance is shrunk towards its diagonal by d / (S + d), which keeps it
    positive definite for d >= S; a row with fewer than two finite draws gets N(0, I).
    """
    s, _, d = u.shape
    finite = torch.isfinite(u).all(-1, keepdim=True)
    weight = finite.to(u.dtype)
    count = weight.sum(0)
    u = torch.where(finite, u, torch.zeros((), dtype=u.dtype))
    loc = (weight * u).sum(0) / count.clamp(min=1)
    centered = (u - loc) * weight
    cov = torch.einsum("sbi,sbj->bij", centered, centered) / (count - 1).clamp(min=1)[..., None]
    shrink = d / (s + d)
    cov = (1 - shrink) * cov + shrink * torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    few = (count < 2)[..., None]
    loc = torch.where(few[..., 0], torch.zeros((), dtype=u.dtype), loc)
    cov = torch.where(few, eye, cov)
    # A point mass (zero variance) still needs a valid Cholesky factor.
    jitter = 1e-8 * (1 + cov.diagonal(dim1=-2, dim2=-1).mean(-1))[..., None, None]
    return loc, torch.linalg.cholesky(cov + jitter * eye)


def _particle_elbo(num_particles: int) -> Trace_ELBO:
    return Trace_ELBO(
        num_particles=positive_int(num_particles, "num_particles"),
        vectorize_particles=True,
        max_plate_nesting=1,
    )


class _Summed:
    """A callback that reads the ELBO summed over ranks (each rank has its rows' share)."""

    def __init__(self, callback):
        self.callback = callback

    def __call__(self, step: int, elbo: float) -> bool:
        return self.callback(step, summed_over_group(elbo))


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
    """The local family to fit: ``local`` if given, checked against the guide's own."""
    if local is not None:
        one_of(local, FAMILIES, "local")
    family = guide_family(guide, x)
    name = described(guide)
    if family is None:
        if local is None:
            raise ValueError(
                f"cannot tell the variational family of {name} (a guide with several "
                "sites, or not a Normal/MultivariateNormal, and no `family` attribute): "
                f"pass local= one of {FAMILIES}, or give the guide a `family` attribute"
            )
        return local
    if local is None:
        if family not in FAMILIES:
            raise ValueError(
                f"{name} has family {family!r}, which has no local counterpart: local "
                f"families are {FAMILIES} (Gaussian or flow); pass local= one of them with "
                "match_family=False to compare across families on purpose"
            )
        return family
    if local != family and match_family:
        raise ValueError(
            f"local={local!r} but {name} is of family {family!r}: the amortization gap "
            "L[q*] - L[q] means what amortization costs only when q* is the best member "
            "of the encoder's own family (otherwise it mixes in the difference between "
            f"families); use local={family!r}, or match_family=False to compare across "
            "families on purpose"
        )
    return local


def guide_family(guide, x: Tensor) -> str | None:
    """The variational family of ``guide``: its ``family`` attribute, else its trace.

    From the trace, a guide with one latent site (and no auxiliary one) is ``"diag"``
    for a Normal, ``"full"`` for a MultivariateNormal, ``"delta"`` for a point mass;
    anything else gives None (unknown).
    """
    family = getattr(guide, "family", None)
    if family is not None:
        return family
    first = torch.zeros(1, dtype=torch.long, device=x.device)
    with torch.no_grad(), pyro.validation_enabled(False):
        trace = poutine.trace(guide).get_trace(x[:1], first, len(x))
    sites = [site for site in trace.nodes.values() if is_latent_site(site)]
    if len(sites) != 1 or sites[0]["infer"].get("is_auxiliary"):
        return None
    fn = sites[0]["fn"]
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    if isinstance(fn, dist.Delta):
        return "delta"
    try:
        return family_of(fn)
    except ValueError:
        return None


def _eval_seed(seed: int | None) -> int:
    if seed is not None:
        return seed + 1
    return int(torch.randint(0, 2**31 - 1, ()).item())


LOG_PX_METHODS = ("auto", "exact", "is", "ais")


def _mean_or_nan(values: Tensor) -> float:
    return float(values.mean()) if len(values) else math.nan


def _settings_text(settings: dict) -> str:
    if not settings:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"


def _log_px_method(model, log_px: str) -> str:
    """The method a ``log_px`` option resolves to, checked before any work."""
    one_of(log_px, LOG_PX_METHODS, "log_px")
    has_marginal = callable(getattr(model, "marginal", None))
    if log_px == "exact" and not has_marginal:
        raise ValueError(
            f"log_px='exact' needs a closed-form marginal(); {described(model)} has "
            "none: use 'is' or 'ais'"
        )
    if log_px == "auto":
        return "exact" if has_marginal else "importance"
    return {"is": "importance"}.get(log_px, log_px)


def _log_px(model, space, x, lw_local, method, local_guide, settings, seed, progress):
    """log p(x) per datapoint, its per-sample influence [K, N] on the paired errors, and
    a standard error independent of those samples (AIS), shape (N,)."""
    no_extra = torch.zeros_like(lw_local[0])
    if method == "exact":
        with torch.no_grad():
            exact = model.marginal().log_prob(x).to(lw_local)
        return exact, torch.zeros_like(lw_local), no_extra
    if method == "ais":
        result = ais_trusted(model, local_guide, space, x, seed=seed, progress=progress,
                             **settings)
        return result.log_marginal, torch.zeros_like(lw_local), result.log_marginal_se
    log_px = torch.logsumexp(lw_local, 0) - math.log(len(lw_local))
    # Delta method: log mean(w) moves by (w_k / mean(w) - 1) / K per sample.
    return log_px, (lw_local - log_px).exp(), no_extra


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
