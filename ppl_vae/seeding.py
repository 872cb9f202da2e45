"""Random draws that depend only on (seed, datapoint index): blocks of rows, seeded apart.

A seeded evaluation must give every datapoint the same numbers however the work is cut:
whatever the chunk size, in one call or two (the second with its rows offset by ``idx``),
in one process or several. Pyro's sample sites draw from torch's global generator, in
the order and shapes of each call, so the library fixes those instead: rows are grouped
into blocks of ``ROW_BLOCK`` consecutive dataset indices, each block is run as one
padded batch of exactly ``ROW_BLOCK`` rows (row ``i`` in slot ``i % ROW_BLOCK``), and
the generator is reseeded from (seed, block, counter) before every such run. A row's
draws then depend only on its index, the seed and the counter.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyro.util
import torch
from torch import Tensor

ROW_BLOCK = 16
_MASK = (1 << 64) - 1


def check_seed(seed, name: str = "seed") -> int | None:
    """``seed`` as an int in [0, 2**63), None passed through, or a ValueError."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{name} must be an integer or None, got {seed!r}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed!r}")
    return int(seed)


def base_seed(seed: int | None) -> int:
    """``seed``, or a fresh one drawn from torch's generator when it is None."""
    if seed is not None:
        return seed
    return int(torch.randint(0, 2**62, ()).item())


def unit_seed(seed: int, *counters: int) -> int:
    """A 63-bit seed mixed from ``seed`` and counters (SplitMix64 steps)."""
    state = seed & _MASK
    for counter in counters:
        state = _splitmix(state ^ ((counter + 0x9E3779B97F4A7C15) & _MASK))
    return state >> 1


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def seed_torch(seed: int, *counters: int) -> None:
    """Reseed torch's global generator(s) for one unit of work.

    The same as ``torch.manual_seed``, without its lazy queueing of seeds for devices
    that were never started (which records a stack trace per call: a third of the time
    of a small model's importance sampling).
    """
    value = unit_seed(seed, *counters)
    torch.default_generator.manual_seed(value)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(value)


def generator(seed: int, *counters: int, device=None) -> torch.Generator:
    """A private generator on ``device`` for one unit of work."""
    g = torch.Generator(device=device or "cpu")
    g.manual_seed(unit_seed(seed, *counters))
    return g


@dataclass(frozen=True)
class Block:
    """One padded batch of ``ROW_BLOCK`` rows of a call.

    ``number`` is the block's index in the dataset (dataset index // ROW_BLOCK);
    ``rows`` the positions in the call of the ``ROW_BLOCK`` slots (fillers repeat a real
    row); ``real`` marks the slots that hold their own row; ``positions`` the call
    positions of the real slots, in slot order.
    """

    number: int
    rows: Tensor
    real: Tensor
    positions: Tensor


def blocks(idx: Tensor) -> Iterator[Block]:
    """The padded blocks covering every row of a call with dataset indices ``idx``.

    A dataset index that appears twice in one call goes to a second batch of the same
    block, so both copies get the same draws.
    """
    idx = idx.cpu()
    order = torch.argsort(idx, stable=True)
    ordered = idx[order]
    if bool((ordered[1:] != ordered[:-1]).all()):
        return _distinct_blocks(order, ordered)
    return _blocks_in_layers(order, ordered)


def _blocks_in_layers(order: Tensor, ordered: Tensor) -> Iterator[Block]:
    """The blocks of a call with indices ``ordered`` (sorted, at positions ``order``),
    one block and layer at a time."""
    numbers, counts = torch.unique_consecutive(ordered // ROW_BLOCK, return_counts=True)
    start = 0
    for number, count in zip(numbers.tolist(), counts.tolist(), strict=True):
        members = order[start : start + count]
        slots = ordered[start : start + count] % ROW_BLOCK
        start += count
        yield from _layers(number, members, slots)


def _distinct_blocks(order: Tensor, ordered: Tensor) -> Iterator[Block]:
    """The blocks of a call whose indices are all distinct (the common case), built for
    all blocks at once: the same blocks as :func:`_layers` makes one by one (the filler
    of a block is its lowest-index row; its real slots hold its rows in index order)."""
    numbers, block, counts = torch.unique_consecutive(
        ordered // ROW_BLOCK, return_inverse=True, return_counts=True)
    slots = ordered % ROW_BLOCK
    rows = order[counts.cumsum(0) - counts].unsqueeze(1).repeat(1, ROW_BLOCK)
    rows[block, slots] = order
    taken = torch.zeros(len(numbers), ROW_BLOCK, dtype=torch.bool)
    taken[block, slots] = True
    members = order.split(counts.tolist())
    for number, block_rows, block_taken, positions in zip(
            numbers.tolist(), rows, taken, members, strict=True):
        yield Block(number, block_rows, block_taken, positions)


def _layers(number: int, members: Tensor, slots: Tensor) -> Iterator[Block]:
    remaining_members, remaining_slots = members, slots
    while len(remaining_members):
        keep = _first_of_each_slot(remaining_slots)
        taken = torch.zeros(ROW_BLOCK, dtype=torch.bool)
        taken[remaining_slots[keep]] = True
        rows = torch.full((ROW_BLOCK,), int(remaining_members[keep][0]))
        rows[remaining_slots[keep]] = remaining_members[keep]
        yield Block(number, rows, taken, rows[taken])
        remaining_members, remaining_slots = remaining_members[~keep], remaining_slots[~keep]


def _first_of_each_slot(slots: Tensor) -> Tensor:
    """Marks the first occurrence of each slot number (a later copy waits a layer)."""
    if len(torch.unique(slots)) == len(slots):  # the common case: no index twice
        return torch.ones(len(slots), dtype=torch.bool)
    keep = torch.zeros(len(slots), dtype=torch.bool)
    seen: set[int] = set()
    for i, slot in enumerate(slots.tolist()):
        if slot not in seen:
            seen.add(slot)
            keep[i] = True
    return keep


@contextlib.contextmanager
def caller_rng_kept(keep: bool = True):
    """Leave the caller's random state as it was (a seeded call must not reseed it)."""
    if not keep:
        yield
        return
    state = random_state()
    try:
        yield
    finally:
        set_random_state(state)


def random_state() -> dict:
    """Every global generator a call may draw from: torch's, CUDA's (where CUDA has
    started), Python's and numpy's. ``pyro.util.get_rng_state`` leaves CUDA's out, and
    a model on a GPU draws its samples from them."""
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    """Restore what :func:`random_state` returned."""
    pyro.util.set_rng_state(state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), Python's ``random`` and numpy's global generator.

    The same as ``pyro.set_rng_seed`` for seeds below 2**32; numpy takes 32 bits only,
    so it gets ``seed mod 2**32``.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict:
    """:func:`random_state` in a form a checkpoint loads with weights_only."""
    state = random_state()
    kind, keys, position, has_gauss, cached = state["numpy"]
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                      cached]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (from a checkpoint, too)."""
    version, internal, gauss = state["random"]
    kind, keys, position, has_gauss, cached = state["numpy"]
    set_random_state({**state, "random": (version, tuple(internal), gauss),
                      "numpy": (kind, keys.numpy().astype(np.uint32), position, has_gauss,
                                cached)})
