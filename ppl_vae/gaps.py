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
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from ppl_vae import json_output
from ppl_vae.ais import ais_trusted
from ppl_vae.estimators import (
    log_weights_trusted,
    mean_se,
    pareto_khat,
)
from ppl_vae.local_fit import fit_local_trusted, local_family
from ppl_vae.programs import as_checked_programs
from ppl_vae.seeding import caller_rng_kept, check_seed, unit_seed
from ppl_vae.settings import module_local
from ppl_vae.structure import described
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
# The counter that gives log_px="ais" a seed of its own, apart from the weights' draws.
AIS_STREAM = 0xA15


@dataclass(frozen=True)
class GapReport:
    """The inference gap of an encoder, split into approximation and amortization gaps.

    Floats are means in nats per datapoint, each with a standard error ``<name>_se``;
    ``per_datapoint`` holds the same names as Tensors of shape (N,), and ``"khat"``.
    How each number is estimated: :doc:`gaps`.

    The standard errors are those of the evaluation: the Monte Carlo error of the K
    draws (and of AIS) given the fitted local guides. The local fit is random too: a
    fit under another seed ends at another q*, and across seeds L[q*] and the
    approximation gap spread about twice as far as their errors at 300 steps (measured
    on a linear-Gaussian model). To include that, repeat ``gaps`` over seeds.

    Attributes
    ----------
    log_px : float
        log p(x): exact, or estimated as ``log_px_method`` and ``log_px_settings`` say.
    elbo_local, elbo_amortized : float
        L[q*], the ELBO of the fitted local guide, and L[q], that of the encoder.
    approximation_gap, amortization_gap, inference_gap : float
        log p(x) - L[q*], L[q*] - L[q], and their sum log p(x) - L[q].
    khat_mean, khat_max : float
        PSIS k-hat of the local guide's importance weights; above 0.7 an
        importance-sampled log p(x) is unreliable.
    log_px_method : {"exact", "importance", "ais"}
    log_px_settings : dict
    local_family : {"diag", "full"}
    num_samples, num_data, local_steps : int
        K samples per datapoint of every estimate, N, the local fit's optimizer steps.
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
    local_steps: int | None = None,
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

    Fits q* of the encoder's family per datapoint (from the encoder, model frozen), then
    estimates log p(x), L[q*] and L[q] per datapoint from K paired draws; a GapReport.

    Parameters
    ----------
    model, guide : PyroModule or Pyro program
        ``guide``: an encoder with a density for each of the model's latents.
    x : Tensor or ndarray of shape (N, D)
    local : {"diag", "full", "flow"}, optional
        The family of q*; by default the encoder's (``match_family=False`` to differ).
    num_samples : int
        K, samples per datapoint of every estimate.
    log_px : {"auto", "exact", "is", "ais"}
        "auto": exact where the model has ``marginal()``, else importance sampling.
    local_steps, local_lr, local_particles, ais_steps, ais_chains, seed, progress, plate
        The local fit's budget (see :func:`ppl_vae.fit_local`; steps None: the
        family's), AIS's for
        ``log_px="ais"``, the seed, the progress bar, and the data plate's name.

    Examples
    --------
    >>> import torch, ppl_vae
    >>> from ppl_vae.models import PPCA; from ppl_vae.guides import LinearEncoder
    >>> x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    >>> r = ppl_vae.gaps(PPCA.from_data(x, latent_dim=2), LinearEncoder(5, 2), x,
    ...                  local_steps=200, num_samples=200, seed=0, progress=False)
    >>> bool(abs(r.approximation_gap + r.amortization_gap - r.inference_gap) < 1e-6)
    True
    """
    x = as_data(x, model)
    seed = check_seed(seed)
    # Every stage is seeded from seed: a seeded call leaves the caller's generators where
    # they were.
    with caller_rng_kept(seed is not None):
        # A guide that cannot be a proposal (a point mass, missing sites) is refused before
        # the local fit, not after it.
        model, guide, space = as_checked_programs(model, guide, x, plate=plate)
        num_samples = positive_int(num_samples, "num_samples")
        if local_steps is not None:
            positive_int(local_steps, "local_steps")
        positive_int(local_particles, "local_particles")
        method = _log_px_method(model, log_px)
        if method == "ais":
            positive_int(ais_steps, "ais_steps")
            positive_int(ais_chains, "ais_chains")
        family = local_family(guide, x, local, match_family)
        local_guide, fitted = fit_local_trusted(
            model, x, family, init_from=guide, steps=local_steps, lr=local_lr,
            num_particles=local_particles, progress=progress, seed=seed, space=space,
        )
        settings = {"num_steps": ais_steps, "num_chains": ais_chains} if method == "ais" else {}
        per = _estimates(model, (local_guide, guide), space, x, method, settings, num_samples,
                         evaluation_seed(seed), progress)
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


def evaluation_seed(seed: int | None) -> int:
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


def _estimates(model, guides, space, x, method, settings, num_samples, seed, progress):
    """Per-datapoint estimates and their paired standard errors (see :func:`_per_datapoint`).

    log p(x) comes first where it needs x beyond the weights (the closed form, or AIS
    from the local guides); then the local and the amortized guides' [K, N] log-weights,
    drawn with the same seeded eps (their errors are paired). AIS draws from a stream of
    its own, so its error is independent of theirs. Each is seeded on its own, so the
    order changes no number.
    """
    local_guide, guide = guides
    exact = annealed = None
    if method == "exact":
        with torch.no_grad():
            exact = model.marginal().log_prob(x)
    elif method == "ais":
        # A stream of its own: AIS seeded like the weights starts its chains from the
        # local guide's first draws, and its error, combined below as an independent one,
        # then overstated the gaps' (1.3x-1.8x at K = 16).
        ais_seed = None if seed is None else unit_seed(seed, AIS_STREAM)
        annealed = ais_trusted(model, local_guide, space, x, seed=ais_seed, progress=progress,
                               **settings)
    lw_local = log_weights_trusted(model, local_guide, x, num_samples, seed)
    lw_amortized = log_weights_trusted(model, guide, x, num_samples, seed)
    estimate, px_influence, extra_se = _log_px(lw_local, exact, annealed)
    per = _per_datapoint(estimate, px_influence, lw_local, lw_amortized)
    for name in ("log_px_se", "approximation_gap_se", "inference_gap_se"):
        per[name] = torch.hypot(per[name], extra_se)
    return per


def _log_px(lw_local, exact, annealed):
    """log p(x) per datapoint, its per-sample influence [K, N] on the paired errors, and
    a standard error independent of those samples (AIS), shape (N,): from the closed
    form ``exact``, the AIS result ``annealed``, or else importance sampling."""
    no_extra = torch.zeros_like(lw_local[0])
    if exact is not None:
        return exact.to(lw_local), torch.zeros_like(lw_local), no_extra
    if annealed is not None:
        return annealed.log_marginal, torch.zeros_like(lw_local), annealed.log_marginal_se
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
