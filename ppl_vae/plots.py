"""Matplotlib figures of the library's reports.

matplotlib is imported inside each function, so importing ``ppl_vae`` never loads it.
Every function draws on ``ax`` (a new figure's Axes when None) through the object API,
never calls ``show()``, and returns the Axes: they work under the Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence

# k-hat above this is drawn at it by plot_weight_diagnostics: the estimate is already hopeless.
KHAT_DISPLAY_MAX = 2.0


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


def plot_elbo_trace(
    result,
    ax=None,
    *,
    label: str | Sequence[str] | None = None,
    smooth: int | None = 50,
    reference: float | None = None,
):
    """ELBO per datapoint against SVI step: the raw trace faint, its running mean solid.

    Parameters
    ----------
    result : FitResult or sequence of FitResult
        One trace per result (to compare runs on one Axes).
    ax : matplotlib Axes, optional
    label : str or sequence of str, optional
        One per result.
    smooth : int, optional
        Width in steps of the trailing running mean; None or 1 draws the raw trace only.
    reference : float, optional
        A value in nats drawn as a horizontal dashed line (the exact maximum
        log-likelihood per datapoint, for example).

    Returns
    -------
    matplotlib Axes
    """
    import numpy as np

    results = [result] if hasattr(result, "history") else list(result)
    if not results:
        raise ValueError("result must be a FitResult or a non-empty sequence of them")
    labels = [label] if label is None or isinstance(label, str) else list(label)
    if len(labels) == 1 and len(results) > 1 and labels[0] is None:
        labels = labels * len(results)
    if len(labels) != len(results):
        raise ValueError(
            f"label must have one entry per result ({len(results)}), got {len(labels)}"
        )
    if smooth is not None and (int(smooth) != smooth or smooth < 1):
        raise ValueError(f"smooth must be a positive integer or None, got {smooth!r}")
    ax = _axes(ax)
    for i, (res, name) in enumerate(zip(results, labels, strict=True)):
        history = np.asarray(res.history, dtype=float)
        steps = np.arange(len(history))
        color = f"C{i % 10}"
        if smooth is None or smooth == 1:
            ax.plot(steps, history, color=color, label=name)
            continue
        ax.plot(steps, history, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _running_mean(history, int(smooth)), color=color,
                label=f"{name} (mean of {smooth} steps)" if name else f"mean of {smooth} steps")
    if reference is not None:
        ax.axhline(float(reference), color="black", linestyle="--", linewidth=1,
                   label=f"reference {float(reference):.3f}")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO (nats per datapoint)")
    ax.set_title("ELBO during training")
    if ax.get_legend_handles_labels()[1]:
        ax.legend()
    return ax


def plot_latents(z, labels=None, ax=None, *, title: str = "Latent space"):
    """Scatter of latent codes (posterior means, say) in two dimensions.

    Parameters
    ----------
    z : Tensor or ndarray of shape (N, k), k >= 2
        Only the first two dimensions are drawn; the title says so when k > 2.
    labels : array-like of int of shape (N,), optional
        Class of each point: colours, with a legend of the classes (a colorbar when
        there are more than 10).
    ax : matplotlib Axes, optional
    title : str

    Returns
    -------
    matplotlib Axes
    """
    import numpy as np

    z = _numpy(z)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"z must have shape (N, k) with k >= 2, got shape {tuple(z.shape)}")
    if labels is not None:
        labels = _numpy(labels).reshape(-1)
        if len(labels) != len(z):
            raise ValueError(
                f"labels must have one entry per row of z ({len(z)}), got {len(labels)}"
            )
    ax = _axes(ax)
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=8, alpha=0.7)
    else:
        classes = np.unique(labels)
        if len(classes) <= 10:
            for i, c in enumerate(classes):
                mask = labels == c
                ax.scatter(z[mask, 0], z[mask, 1], s=8, alpha=0.7, color=f"C{i}", label=str(c))
            ax.legend(title="class", markerscale=2, fontsize="small", loc="best")
        else:
            points = ax.scatter(z[:, 0], z[:, 1], c=labels, s=8, alpha=0.7, cmap="viridis")
            ax.figure.colorbar(points, ax=ax, label="class")
    k = z.shape[1]
    ax.set_title(title if k == 2 else f"{title} (first 2 of {k} dimensions)")
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    return ax


def plot_image_grid(images, ax=None, *, shape: tuple[int, int] | None = None,
                    ncols: int = 10, title: str | None = None, pad: int = 0):
    """Tile flat images into one grey picture, row by row (empty cells are black).

    Parameters
    ----------
    images : Tensor or ndarray of shape (n, D), values in [0, 1]
    ax : matplotlib Axes, optional
    shape : (int, int), optional
        ``(h, w)`` of one image, with ``h * w == D``; by default square, ``sqrt(D)``.
    ncols : int
        Images per row (fewer when there are fewer images).
    title : str, optional
    pad : int
        Black pixels around each image, so that tiles whose content reaches their
        border (the 8x8 digits) stay apart.

    Returns
    -------
    matplotlib Axes
    """
    import math

    import numpy as np

    images = _numpy(images).astype(float)
    if images.ndim != 2 or images.shape[0] < 1:
        raise ValueError(
            f"images must have shape (n, D) with n >= 1, got shape {tuple(images.shape)}"
        )
    n, d = images.shape
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"images must hold finite values in [0, 1], got values in "
            f"[{images.min():.3g}, {images.max():.3g}]"
        )
    if shape is None:
        side = math.isqrt(d)
        if side * side != d:
            raise ValueError(f"images have D={d} pixels, not a square: give shape=(h, w)")
        shape = (side, side)
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1 or h * w != d:
        raise ValueError(f"shape must be (h, w) with h * w == D={d}, got {tuple(shape)}")
    if int(ncols) != ncols or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
    if int(pad) != pad or pad < 0:
        raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
    ncols = min(int(ncols), n)
    nrows = math.ceil(n / ncols)
    tiles = np.pad(images.reshape(n, h, w), ((0, 0), (pad, pad), (pad, pad)))
    th, tw = h + 2 * pad, w + 2 * pad
    grid = np.zeros((nrows * ncols, th, tw))
    grid[:n] = tiles
    grid = grid.reshape(nrows, ncols, th, tw).transpose(0, 2, 1, 3).reshape(nrows * th, ncols * tw)
    ax = _axes(ax)
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{ncols} per row, {h}x{w} pixels each")
    ax.set_ylabel(f"{nrows} row{'s' if nrows > 1 else ''}")
    ax.set_title(title if title is not None else f"{n} images")
    return ax


def plot_weight_diagnostics(diag, axes=None):
    """Two histograms of the importance weights' health, one value per datapoint.

    Left: PSIS k-hat, with the thresholds 0.5 (good) and 0.7 (above it the log p(x)
    estimate is unreliable); values above ``KHAT_DISPLAY_MAX`` are drawn in the last bin.
    Right: effective sample size as a fraction of K, on log-spaced bins over [1/K, 1].

    Parameters
    ----------
    diag : Diagnostics
    axes : sequence of two matplotlib Axes, optional

    Returns
    -------
    ndarray of two matplotlib Axes
    """
    import numpy as np

    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    axes = np.asarray(axes, dtype=object).reshape(-1)
    if len(axes) != 2:
        raise ValueError(f"axes must hold two Axes, got {len(axes)}")
    khat = _numpy(diag.khat).astype(float)
    k = int(diag.num_samples)
    ess_fraction = _numpy(diag.ess).astype(float) / k
    finite = khat[np.isfinite(khat)]
    above = float((khat > 0.7).mean()) if len(khat) else 0.0

    ax = axes[0]
    # k-hat of a hopeless proposal runs into the tens; beyond KHAT_DISPLAY_MAX the value
    # says nothing more, so those points are drawn in the last bin.
    clipped = np.minimum(finite, KHAT_DISPLAY_MAX)
    if len(finite):
        low = min(0.0, float(clipped.min()))
        ax.hist(clipped, bins=30, range=(low, KHAT_DISPLAY_MAX), color="C0", alpha=0.8)
    ax.axvline(0.5, color="C2", linestyle="--", label="0.5: good below")
    ax.axvline(0.7, color="C3", linestyle="--", label="0.7: unreliable above")
    overflow = int((finite > KHAT_DISPLAY_MAX).sum())
    ax.set_xlabel("PSIS k-hat" + (f" ({overflow} above {KHAT_DISPLAY_MAX:g} drawn at it)"
                                  if overflow else ""))
    ax.set_ylabel("datapoints")
    note = "" if len(finite) == len(khat) else f"; {len(khat) - len(finite)} not finite"
    ax.set_title(f"PSIS k-hat: {above:.1%} of datapoints above 0.7{note}")
    ax.legend(fontsize="small")

    ax = axes[1]
    # ESS/K lies in [1/K, 1]: log-spaced bins show a collapsed proposal (ESS near 1) and a
    # good one (ESS near K) on one axis.
    if k > 1:
        bins = np.geomspace(1.0 / k, 1.0, 31)
        ax.hist(np.clip(ess_fraction, 1.0 / k, 1.0), bins=bins, color="C1", alpha=0.8)
        ax.set_xscale("log")
    else:
        ax.hist(ess_fraction, bins=1, color="C1", alpha=0.8)
    ax.set_xlabel(f"ESS / K (K = {k})")
    ax.set_ylabel("datapoints")
    ax.set_title(f"Effective sample size: mean ESS/K = {ess_fraction.mean():.3f}")
    return axes


def _running_mean(values, width: int):
    """Trailing mean over the last ``width`` values (fewer at the start)."""
    import numpy as np

    csum = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - width, 0)
    return (csum[ends] - csum[starts]) / (ends - starts)


def _numpy(values):
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _axes(ax):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    # pyplot, so that notebooks show the new figure; nothing here needs a GUI backend.
    _, ax = plt.subplots()
    return ax
