"""Matplotlib figures of the library's reports.

matplotlib is imported inside each function, so importing ``ppl_vae`` never loads it.
Every function draws on ``ax`` (a new figure's Axes when None) through the object API,
never calls ``show()``, and returns the Axes: they work under the Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence


def plot_gaps(report, ax=None, *, labels: Sequence[str] | None = None):
    """Stacked bars: approximation gap below, amortization gap above, in nats.

    The height of each bar is the inference gap log p(x) - L[q]; the error bar on its
    top is that gap's standard error.

    Parameters
    ----------
    report : GapReport or sequence of GapReport
        One bar per report (to compare encoders or models side by side).
    ax : matplotlib Axes, optional
    labels : sequence of str, optional
        One per report; by default the local family and how log p(x) was computed.

    Returns
    -------
    matplotlib Axes
    """
    reports = [report] if hasattr(report, "approximation_gap") else list(report)
    if labels is None:
        labels = [f"{r.local_family} (log p(x) {r.log_px_method})" for r in reports]
    if len(labels) != len(reports):
        raise ValueError(
            f"labels must have one entry per report ({len(reports)}), got {len(labels)}"
        )
    ax = _axes(ax)
    positions = range(len(reports))
    approximation = [r.approximation_gap for r in reports]
    amortization = [r.amortization_gap for r in reports]
    ax.bar(positions, approximation, width=0.6, color="C0", label="approximation gap")
    ax.bar(positions, amortization, width=0.6, bottom=approximation, color="C1",
           label="amortization gap")
    ax.errorbar(positions, [r.inference_gap for r in reports],
                yerr=[r.inference_gap_se for r in reports], fmt="none", ecolor="black",
                capsize=4, label="inference gap ± se")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(list(positions))
    ax.set_xticklabels(labels)
    ax.set_ylabel("gap (nats per datapoint)")
    ax.set_title("Inference gap = approximation gap + amortization gap")
    ax.legend()
    return ax


def plot_refinement(curve, ax=None):
    """Mean ELBO against refinement steps, with a ±1 se band and the target L[q*].

    Parameters
    ----------
    curve : RefinementCurve
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax)
    ax.plot(curve.steps, curve.elbo, marker="o", markersize=3, color="C0",
            label="refined local guide")
    ax.fill_between(curve.steps, curve.elbo - curve.elbo_se, curve.elbo + curve.elbo_se,
                    color="C0", alpha=0.25, linewidth=0)
    ax.axhline(curve.elbo[0], color="C1", linestyle=":", label="encoder, L[q]")
    if curve.target_elbo is not None:
        ax.axhline(curve.target_elbo, color="C2", linestyle="--", label="local optimum, L[q*]")
    ax.set_xlabel("SVI steps per datapoint, from the encoder's output")
    ax.set_ylabel("mean ELBO (nats per datapoint)")
    ax.set_title("Semi-amortized refinement")
    ax.legend()
    return ax


def _axes(ax):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    # pyplot, so that notebooks show the new figure; nothing here needs a GUI backend.
    _, ax = plt.subplots()
    return ax
