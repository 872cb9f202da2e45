"""Input checks that run before any work, with messages that name the argument."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def as_data(x, model=None, *, name: str = "x", check_values: bool = True) -> Tensor:
    """Validate a dataset and return it as a floating tensor on the model's device.

    Checks: a tensor or array, rank 2 (N, D), at least one row, finite values, D equal
    to ``model.data_dim``, and whatever ``model.validate_data(x)`` adds (for example
    binary values for a Bernoulli likelihood; skipped with ``check_values=False``).
    Integer input becomes float32; the model's dtype and device win when it has
    parameters.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {x.ndim} dims: {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    # A meta tensor has a shape but no values: nothing can be computed from it, and
    # torch says so only from deep inside ("Cannot copy out of meta tensor").
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device: a shape {tuple(x.shape)} with no "
                         f"values; move real data to a real device, e.g. {name}.to('cpu')")
    if not x.is_floating_point():
        x = x.float()
    # The model's place is read apart from x, so that x is handed to no helper here.
    x = x.to(**_place_of(model))
    if x.is_meta:
        raise ValueError(f"the model's parameters are on the meta device (no values), so {name} "
                         "cannot be scored: initialize or load them on a real device first")
    bad = ~torch.isfinite(x)
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN or inf values (first in row {row})"
        )
    data_dim = getattr(model, "data_dim", None)
    if data_dim is not None and x.shape[1] != data_dim:
        raise ValueError(
            f"{name} has {x.shape[1]} columns but the model's data_dim is {data_dim}"
        )
    check = getattr(model, "validate_data", None)
    if check_values and callable(check):
        check(x)
    return x


def _place_of(model) -> dict:
    """The device and dtype of the model's parameters ({} for none)."""
    if not isinstance(model, torch.nn.Module):
        return {}
    first = next(iter(model.parameters()), None)
    if first is None:
        return {}
    return {"device": first.device, "dtype": first.dtype}


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_number(value, name: str) -> float:
    """``value`` as a finite float > 0, or a ValueError naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def one_of(value, choices: tuple, name: str):
    """``value`` if it is one of ``choices``, or a ValueError naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
