"""Row indices of shuffled epochs, with a state a checkpoint can hold (resume replays the
same order)."""

from __future__ import annotations

import torch
from torch import Tensor


class Batches:
    """Row indices of shuffled epochs, with a state a checkpoint can hold; all rows in
    order when a batch holds them all."""

    def __init__(self, num_data: int, batch_size: int, seed: int | None, device):
        self.num_data, self.batch_size, self.device = num_data, batch_size, device
        # Without a seed the order comes from torch's global generator (randperm's
        # default), whose state is saved with the others.
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.order: Tensor | None = None
        self.position = 0

    def next(self) -> Tensor:
        if self.batch_size >= self.num_data:
            # A full batch is every row in order: its sum does not depend on the order,
            # and a local guide then reads its per-row parameters whole (no gather).
            return torch.arange(self.num_data, device=self.device)
        if self.order is None or self.position >= self.num_data:
            self.order = torch.randperm(self.num_data, generator=self.generator)
            self.position = 0
        idx = self.order[self.position:self.position + self.batch_size]
        self.position += len(idx)
        return idx.to(self.device)

    def state_dict(self) -> dict:
        generator = self.generator.get_state() if self.generator is not None else None
        return {"generator": generator, "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], int(state["position"])
