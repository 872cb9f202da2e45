"""Timing helpers shared by the benchmarks: alternating repeats, medians, ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch


def timed_steps(step: Callable[[], None], num_steps: int) -> np.ndarray:
    """Seconds of each of ``num_steps`` calls of ``step``."""
    seconds = np.empty(num_steps)
    for i in range(num_steps):
        start = time.perf_counter()
        step()
        seconds[i] = time.perf_counter() - start
    return seconds


def plain_training_step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]):
    """One step of a hand-written loop, doing what ``fit`` does per step."""

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.item()  # fit reads the loss every step (history, NaN check)
        loss.backward()
        opt.step()

    return step


def compare_step_times(pyro_run, plain_run, repeats: int) -> tuple[list, list]:
    """Median seconds per step of each run, alternating the two routes so that the
    machine's noise hits both alike."""
    pyro_medians, plain_medians = [], []
    for _ in range(repeats):
        pyro_medians.append(float(np.median(pyro_run())))
        plain_medians.append(float(np.median(plain_run())))
    return pyro_medians, plain_medians


def print_step_table(title: str, pyro_medians: list, plain_medians: list) -> None:
    """The ms/step table and the ratio, median and best over repeats."""
    print(f"{title}; {len(pyro_medians)} alternating repeats, {torch.get_num_threads()} threads")
    print(row("route", "median ms/step", "best ms/step"))
    print(row("---", "---", "---"))
    for name, times in (("ppl_vae.fit", pyro_medians), ("plain PyTorch loop", plain_medians)):
        print(row(name, f"{1e3 * statistics.median(times):.3f}", f"{1e3 * min(times):.3f}"))
    ratios = [a / b for a, b in zip(pyro_medians, plain_medians, strict=True)]
    extra = 1e3 * (statistics.median(pyro_medians) - statistics.median(plain_medians))
    print(f"ratio: median {statistics.median(ratios):.3f}x, best-vs-best "
          f"{min(pyro_medians) / min(plain_medians):.3f}x; extra {extra:.3f} ms/step")


def row(*cells) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"
