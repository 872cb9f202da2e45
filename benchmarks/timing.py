"""Timing helpers shared by the benchmarks: medians of repeats, ratios in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def median_step_seconds(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, float]:
    """Median and best over ``repeats`` runs of each run's median seconds per step."""
    medians = [float(np.median(run())) for _ in range(repeats)]
    return statistics.median(medians), min(medians)


def timed_steps(step: Callable[[], None], num_steps: int) -> np.ndarray:
    """Seconds of each of ``num_steps`` calls of ``step``."""
    seconds = np.empty(num_steps)
    for i in range(num_steps):
        start = time.perf_counter()
        step()
        seconds[i] = time.perf_counter() - start
    return seconds


def row(*cells) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"
