"""Strict JSON out of the library and the benchmarks: null for NaN and +-inf (issue 20,
section 5)."""

import json
import math

import numpy as np
import pytest

from benchmarks.store import Store
from ppl_vae.json_output import dumps, finite_or_none


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as jq and JavaScript do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_and_the_rest_is_unchanged():
    value = {"khat": math.inf, "se": math.nan, "low": -math.inf, "x": 1.5, "n": 3,
             "s": "nan", "flag": True, "none": None, "per": [1.0, math.nan, (math.inf, 2)],
             "np": np.float32(np.nan), "np_ok": np.float64(0.25), "np_int": np.int64(7)}
    text = dumps(value, indent=1)
    assert strict_loads(text) == {
        "khat": None, "se": None, "low": None, "x": 1.5, "n": 3, "s": "nan", "flag": True,
        "none": None, "per": [1.0, None, [None, 2]], "np": None, "np_ok": 0.25, "np_int": 7}
    # Python's own json would have written what strict parsers refuse.
    with pytest.raises(ValueError, match="not JSON"):
        strict_loads(json.dumps(value, default=float))
    assert finite_or_none(0.1) == 0.1 and finite_or_none(-0.0) == 0.0


def test_the_benchmark_store_writes_strict_json_and_reads_nan_back_in_lists(tmp_path):
    path = tmp_path / "results.json"
    Store(path).run("a", lambda: {"khat": [0.3, math.inf], "mean": math.nan, "label": None})
    saved = strict_loads(path.read_text())
    assert saved["a"]["khat"] == [0.3, None] and saved["a"]["mean"] is None
    again = Store(path).results["a"]
    assert again["khat"][0] == 0.3 and math.isnan(again["khat"][1])
    assert again["label"] is None  # a null that was never a number stays None
