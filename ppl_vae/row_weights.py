"""A model's own weights and masks, checked on every row.

The estimators score every site of the model unscaled and unmasked but for the data
plate's own factor, and AIS and the local fits move every latent. So a model that scales
a site itself (``poutine.scale``: a tempered or reweighted likelihood) would be scored
as the unscaled model, and a latent whose density the model masks (``obs_mask=``, or
``poutine.mask`` around it) has a flat, improper density where masked. Both are refused
before any work. A weight or mask given per row (``poutine.scale(scale=w[ind])``) may be
1 on the first row alone, so where the first row's trace shows one, every row is read.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppl_vae.guides.latent_space import is_latent_site


def refuse_row_weights(model, trace, x: Tensor, idx, num_data) -> None:
    """Refuse a model's own scales and latent masks, on every row of ``x``. ``trace`` is
    the model's trace on the first row; the trace of every row is taken only where it
    shows a tensor scale or latent mask, which may differ on other rows."""
    _refuse_scaled_sites(trace, float(num_data or 1))
    _refuse_masked_latents(trace)
    if len(x) < 2 or not any(_per_row(site) for site in trace.nodes.values()):
        return
    with torch.no_grad(), pyro.validation_enabled(False):
        every_row = poutine.trace(model).get_trace(x, idx, num_data)
    _refuse_scaled_sites(every_row, (num_data or len(x)) / len(x))
    _refuse_masked_latents(every_row)


def _per_row(site) -> bool:
    """Whether a site's scale, or a latent's mask, is a tensor that may vary by row."""
    if site["type"] != "sample" or site_is_subsample(site):
        return False
    scale, mask = site["scale"], site["mask"]
    return (isinstance(scale, Tensor) and scale.dim() > 0) or (
        is_latent_site(site) and isinstance(mask, Tensor))


def _refuse_masked_latents(trace) -> None:
    """Refuse a latent whose model density is masked (``obs_mask=`` makes one, as does
    ``poutine.mask`` around a latent): where masked it has a flat, improper density, so
    the weights, log p(x) and the ELBO are not defined there. An observed site's mask is
    fine: it leaves those values out of the likelihood."""
    for name, site in trace.nodes.items():
        mask = site.get("mask") if site["type"] == "sample" else None
        if not is_latent_site(site) or mask is None or bool(torch.as_tensor(mask).all()):
            continue
        raise ValueError(
            f"the model masks the density of its latent site {name!r} (obs_mask= or "
            "poutine.mask): where masked the latent has a flat density, so log p(x) and the "
            "ELBO are not defined there and the estimates would read far too high; to leave "
            "missing values out, mask the observed site's distribution instead "
            "(dist.Normal(loc, scale).mask(present).to_event(1)), which scores only the "
            "values present"
        )


def _refuse_scaled_sites(trace, data_scale: float) -> None:
    """Refuse a site that the model itself scales (``poutine.scale``, a tempered or
    reweighted likelihood). The estimators score every site unscaled, which undoes the
    data plate's num_data / rows: a scale of the model's own would be dropped silently.
    ``data_scale`` is the plate's scale on the trace (num_data / its rows); a per-row
    scale is checked value by value."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        scales = torch.as_tensor(site["scale"], dtype=torch.float64).flatten() / data_scale
        off = (scales - 1.0).abs() > 1e-9
        if bool(off.any()):
            own = float(scales[off][0])
            raise ValueError(
                f"the model scales its site {name!r} by {own:g} (poutine.scale, a tempered "
                "or reweighted term): log p(x), the ELBO and AIS are computed for the "
                "unscaled model, so that scale would be dropped without a word; evaluate "
                "the model without it"
            )
