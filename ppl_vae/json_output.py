"""JSON that strict parsers read: non-finite numbers are written as ``null``.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON:
jq, JavaScript's ``JSON.parse`` and most other languages refuse the file. Every JSON the
library, the command line and the benchmarks write goes through :func:`dumps`.
"""

from __future__ import annotations

import json
import math

import numpy as np

__all__ = ["dumps", "finite_or_none"]


def finite_or_none(value):
    """``value`` with every NaN or infinite float replaced by None, recursively.

    Parameters
    ----------
    value : object
        Numbers, strings, None, and dicts, lists and tuples of them (numpy scalars
        become Python numbers).

    Returns
    -------
    object
        The same structure; tuples become lists, as JSON has no tuples.
    """
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` with ``null`` for NaN and +-inf; ``kwargs`` go to ``json.dumps``."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
