"""A datapoint's density must not depend on the other rows of its call.

The engine scores rows in padded blocks: a row shares its call with other rows, filler
copies among them, and a different set of them in every chunking. A program whose
per-row density reads the whole batch (``x.mean(0)``, ``len(x)``, a batch norm) then
gives each row a number that depends on its company, not on the row: no per-datapoint
estimate exists for it. :func:`refuse_coupled_rows` scores one row alone and beside
another, on the same latents, and refuses the program where the two differ. The
library's own modules score rows apart by construction and are not checked.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

# Float rounding differs between a call of one row and one of two (BLAS blocks by the
# row count); a row's company moves its density by far more.
RTOL, ATOL = 1e-4, 1e-4


def refuse_coupled_rows(program, role: str, x: Tensor, idx: Tensor | None,
                        num_data: int) -> None:
    """Raise a ValueError if ``program`` (a converted user program) scores the last row
    of ``x`` (dataset indices ``idx``, default 0..N-1) differently beside the first row
    than alone."""
    if getattr(program, "program_name", None) is None or len(x) < 2:
        return
    if idx is None:
        idx = torch.arange(len(x), device=x.device)
    pair, pair_idx = x[[0, -1]], idx[[0, -1]]
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            together = poutine.trace(program).get_trace(pair, pair_idx, num_data)
            latents = {name: _row(site["value"], site, 1) for name, site in _sites(together)
                       if not site["is_observed"]}
            alone = poutine.trace(poutine.condition(program, data=latents)).get_trace(
                pair[1:], pair_idx[1:], num_data)
    except (ValueError, RuntimeError, IndexError):
        return  # a program that fails here fails in the estimate, with its own message
    for name, site in _sites(together):
        if name not in alone.nodes:
            continue
        beside = site["fn"].log_prob(site["value"])[..., 1:]  # the data plate: dim -1
        single = alone.nodes[name]["fn"].log_prob(alone.nodes[name]["value"])
        if beside.shape == single.shape and not torch.allclose(beside, single, rtol=RTOL,
                                                               atol=ATOL, equal_nan=True):
            raise ValueError(
                f"the {role} ({program.program_name}) scores a datapoint differently "
                f"beside another row than alone: site {name!r} gives "
                f"{float(beside.sum()):.6g} against {float(single.sum()):.6g}. Its density "
                "reads the whole batch (x.mean(0), len(x), a batch norm in training mode) "
                "or is random; the library scores rows in blocks, so each row's estimate "
                "would depend on the rows beside it. Compute such statistics once, outside "
                "the program, and put networks in eval mode"
            )


def _sites(trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _row(value: Tensor, site, row: int) -> Tensor:
    """Row ``row`` of a site's value, whose rows are the batch dim before its event dims."""
    dim = value.dim() - len(site["fn"].event_shape) - 1
    return value.narrow(dim, row, 1)
