"""The result of :func:`ppl_vae.elbo_surgery`: a report, its JSON form and its figure."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

# Per-datapoint quantities, each with a standard error "<name>_se".
QUANTITIES = ("elbo", "reconstruction", "kl", "mutual_information", "marginal_kl")


@dataclass(frozen=True)
class SurgeryReport:
    """An ELBO read term by term, and how much each latent dimension is used.

    The float attributes are means over datapoints in nats per datapoint, each with its
    standard error ``<name>_se`` (the spread over datapoints plus the Monte Carlo noise).

    Attributes
    ----------
    elbo, reconstruction, kl : float
        The ELBO, E_q log p(x | z) (the observed sites) and E_q[log q(z|x) - log p(z)]
        (the latent sites); ``elbo == reconstruction - kl`` exactly.
    mutual_information, marginal_kl : float
        I_q(x; z) and KL(q(z) || p(z)) of the aggregate posterior q(z); they add up to
        ``kl`` (on the same draws, up to float rounding).
    mutual_information_max : float
        log N, the most mutual information N datapoints can hold.
    kl_per_dim, kl_per_dim_se : Tensor of shape (d,)
        E_x KL(q(u | x) || p(u)) of each coordinate u of the latents' values; NaN where
        the guide's density does not factorize (``kl_per_dim_method``, :doc:`surgery`).
    activity, active : Tensor of shape (d,), BoolTensor of shape (d,)
        Cov_x(E_q[u | x]) of each coordinate, and ``activity > threshold``.
    active_units, num_latent_dims : int
    dim_names : tuple of str
        ``"site[j]"`` for coordinate j of a site's flattened value.
    threshold : float
    num_samples, num_data : int
        K draws per datapoint, N datapoints (the aggregate posterior's components).
    per_datapoint : dict of str to Tensor of shape (N,)
        Every quantity of ``QUANTITIES`` and its ``_se``.
    """

    elbo: float
    elbo_se: float
    reconstruction: float
    reconstruction_se: float
    kl: float
    kl_se: float
    mutual_information: float
    mutual_information_se: float
    marginal_kl: float
    marginal_kl_se: float
    mutual_information_max: float
    kl_per_dim: Tensor = field(compare=False)
    kl_per_dim_se: Tensor = field(compare=False)
    activity: Tensor = field(compare=False)
    active_units: int
    num_latent_dims: int
    dim_names: tuple[str, ...]
    kl_per_dim_method: dict[str, str]
    threshold: float
    num_samples: int
    num_data: int
    per_datapoint: dict[str, Tensor] = field(repr=False, compare=False)

    @property
    def active(self) -> Tensor:
        """Which coordinates are active units, a BoolTensor of shape (d,)."""
        return self.activity > self.threshold

    def summary(self) -> dict:
        """The means, their standard errors and the unit counts, as plain floats."""
        out = {name: getattr(self, name) for name in (
            "num_data", "num_samples", "elbo", "elbo_se", "reconstruction",
            "reconstruction_se", "kl", "kl_se", "mutual_information",
            "mutual_information_se", "marginal_kl", "marginal_kl_se",
            "mutual_information_max", "active_units", "num_latent_dims", "threshold")}
        return out

    def to_dict(self, *, per_datapoint: bool = True) -> dict:
        """Plain Python values, JSON-safe: tensors become lists, NaN and inf None."""
        out = {}
        for f in fields(self):
            if f.name == "per_datapoint":
                continue
            value = getattr(self, f.name)
            out[f.name] = _plain(value.tolist() if isinstance(value, Tensor) else value)
        out["dim_names"] = list(self.dim_names)
        if per_datapoint:
            out["per_datapoint"] = {k: _plain(v.tolist()) for k, v in self.per_datapoint.items()}
        return out

    def to_json(self, *, per_datapoint: bool = True, **kwargs) -> str:
        """:meth:`to_dict` as JSON; ``kwargs`` go to ``json.dumps`` (e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(per_datapoint=per_datapoint), allow_nan=False, **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> SurgeryReport:
        """Inverse of :meth:`to_dict` (None comes back as NaN; tensors as float64)."""
        data = dict(data)
        per = {k: _tensor(v) for k, v in data.pop("per_datapoint", {}).items()}
        for name in ("kl_per_dim", "kl_per_dim_se", "activity"):
            data[name] = _tensor(data[name])
        data["dim_names"] = tuple(data["dim_names"])
        for f in fields(cls):
            if f.type == "float" and data.get(f.name) is None:
                data[f.name] = math.nan
        return cls(**data, per_datapoint=per)

    @classmethod
    def from_json(cls, text: str) -> SurgeryReport:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def plot(self, ax=None):
        """KL per dimension, sorted, active units marked.

        See :func:`ppl_vae.surgery_report.plot_kl_per_dim`.
        """
        return plot_kl_per_dim(self, ax=ax)

    def __str__(self) -> str:
        rows = [
            ("ELBO", "elbo"),
            ("reconstruction  E_q log p(x|z)", "reconstruction"),
            ("KL              E_x KL(q(z|x) || p(z))", "kl"),
            ("  mutual information  I_q(x; z)", "mutual_information"),
            ("  marginal KL         KL(q(z) || p(z))", "marginal_kl"),
        ]
        width = max(len(label) for label, _ in rows)
        lines = [
            f"SurgeryReport: {self.num_data} datapoints, K={self.num_samples} draws each "
            "(nats per datapoint)",
            f"  {'':{width}}  {'mean':>12}  {'se':>9}",
        ]
        for label, name in rows:
            lines.append(f"  {label:{width}}  {getattr(self, name):12.4f}  "
                         f"{getattr(self, name + '_se'):9.4f}")
        lines.append(f"  mutual information is at most log N = {self.mutual_information_max:.4f}")
        lines.append(f"  active units: {self.active_units} of {self.num_latent_dims} "
                     f"(Cov_x E_q[u|x] > {self.threshold:g})")
        lines.append(f"  {'dimension':>12}  {'KL':>9}  {'activity':>9}")
        for j in _sorted_dims(self):
            mark = "active" if bool(self.active[j]) else ""
            lines.append(f"  {self.dim_names[j]:>12}  {float(self.kl_per_dim[j]):9.4f}  "
                         f"{float(self.activity[j]):9.4f}  {mark}")
        return "\n".join(lines)


def _sorted_dims(report: SurgeryReport) -> list[int]:
    """Coordinates by KL (largest first), those without a KL by activity after them."""
    kl = report.kl_per_dim.nan_to_num(nan=-math.inf)
    keys = [(-float(kl[j]), -float(report.activity[j].nan_to_num(nan=-math.inf)), j)
            for j in range(report.num_latent_dims)]
    return [j for *_, j in sorted(keys)]


def plot_kl_per_dim(report: SurgeryReport, ax=None):
    """Bars of KL per latent coordinate, sorted, coloured by activity; activity on a
    second axis with the active-unit threshold dashed.

    Parameters
    ----------
    report : SurgeryReport
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes (the KL's; the activity's is its twin)
    """
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(max(4.0, 0.35 * report.num_latent_dims + 2), 3.5))
    order = _sorted_dims(report)
    positions = range(len(order))
    active = [bool(report.active[j]) for j in order]
    colors = ["C0" if a else "0.7" for a in active]
    ax.bar(positions, [float(report.kl_per_dim[j]) for j in order], color=colors,
           yerr=[float(report.kl_per_dim_se[j]) for j in order], capsize=2)
    ax.set_xticks(list(positions))
    ax.set_xticklabels([report.dim_names[j] for j in order], rotation=90)
    ax.set_ylabel("KL per dimension (nats)")
    twin = ax.twinx()
    activity = [max(float(report.activity[j]), 1e-12) for j in order]
    twin.plot(positions, activity, "k.", label="activity Cov_x E_q[u|x]")
    twin.axhline(report.threshold, color="C3", linestyle="--",
                 label=f"active threshold {report.threshold:g}")
    twin.set_yscale("log")
    twin.set_ylabel("activity")
    from matplotlib.patches import Patch

    inactive = report.num_latent_dims - report.active_units
    handles = [Patch(color="C0", label=f"active ({report.active_units})"),
               Patch(color="0.7", label=f"inactive ({inactive})"),
               *twin.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    ax.set_title("ELBO surgery: KL per latent dimension")
    return ax


def _plain(value):
    """NaN and inf to None, recursively (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _tensor(values) -> Tensor:
    def fill(v):
        return [fill(u) for u in v] if isinstance(v, list) else (math.nan if v is None else v)

    return torch.tensor(fill(values), dtype=torch.float64)
