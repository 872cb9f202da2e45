"""Several seeded row blocks in one call of the model, each drawing its own noise.

A seeded estimate runs each block of ``ROW_BLOCK`` rows as its own call, with torch's
generator reseeded for the block (:mod:`ppl_vae.seeding`). For narrow data that call is
mostly Python: a 13-dimensional PPCA spends more time tracing than computing. When every
latent draw of the proposal is a reparameterized Gaussian (``Normal``,
``MultivariateNormal``, a transformed distribution over one, or a ``Delta``, which draws
nothing), its standard-normal noise can be drawn apart from the distribution: each block
draws it from a generator of its own, seeded from (seed, block, sample block), and
``BlockNoise`` hands the concatenation to the sites, so a group of blocks runs as one
call. A row's draws still depend only on the seed and its index.

A group is always ``size`` consecutive blocks, padded with filler rows (and zero noise)
where the call lacks some: its arrays have the same shape in every call, so a row's
numbers are bit for bit the same however the rows are cut into calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.distributions import Delta
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
)

from ppl_vae.guides.latent_space import is_latent_site
from ppl_vae.models.distributions import Normal as LibraryNormal  # loc + eps * scale too
from ppl_vae.models.short_rows import in_place
from ppl_vae.seeding import ROW_BLOCK, Block, generator

# Values of x a group of blocks may span (particles x rows x D): about 4 MB of float32
# per temporary. Past that, on the machines measured, fresh pages for the temporaries
# cost more than the fewer calls save. A PPCA of 13 dims at K = 1000 runs 4 blocks a call.
GROUP_VALUES = 2**20
# At most this many blocks per group: a call pays for the padding of a whole group, so a
# call of 100 rows in groups of 64 blocks (1024 rows) took twice as long as in groups of 16.
MAX_GROUP = 16


def group_size(data_dim: int, samples: int) -> int:
    """Blocks per group for ``samples`` particles of ``data_dim``-wide rows: a power of 2
    up to ``MAX_GROUP``, 1 for data so wide that one block already fills
    ``GROUP_VALUES``."""
    room = min(MAX_GROUP, GROUP_VALUES // (samples * ROW_BLOCK * data_dim))
    return 1 << (room.bit_length() - 1) if room > 1 else 1


def draws_gaussian_noise(fn) -> bool:
    """Whether a site's draw is a reparameterized Gaussian (or a Delta): see module doc."""
    return type(_leaf(fn)).rsample in (Normal.rsample, LibraryNormal.rsample,
                                       MultivariateNormal.rsample, Delta.rsample)


def gaussian_latents(trace) -> bool:
    """Whether every latent site of a trace draws Gaussian noise (or none)."""
    return all(draws_gaussian_noise(site["fn"]) for site in trace.nodes.values()
               if is_latent_site(site))


@dataclass(frozen=True)
class Group:
    """``size`` consecutive blocks run as one call; ``members[j]`` is None for a block the
    call does not have (its slots hold filler rows)."""

    number: int
    members: tuple[Block | None, ...]

    def rows(self) -> Tensor:
        """Call positions of the group's ``size * ROW_BLOCK`` slots."""
        filler = next(block for block in self.members if block is not None).rows[:1]
        return torch.cat([filler.expand(ROW_BLOCK) if block is None else block.rows
                          for block in self.members])

    def real(self) -> Tensor:
        """Which slots hold their own row, BoolTensor of shape (size * ROW_BLOCK,)."""
        return torch.cat([torch.zeros(ROW_BLOCK, dtype=torch.bool) if block is None
                          else block.real for block in self.members])

    def positions(self) -> Tensor:
        """Call positions of the real slots, in slot order."""
        return torch.cat([block.positions for block in self.members if block is not None])


def groups(blocks: list[Block], size: int) -> list[Group]:
    """The call's blocks in groups of ``size`` consecutive block numbers.

    A block number seen twice (an index repeated in the call) starts another group, so
    that both copies get the same draws.
    """
    out: dict[tuple[int, int], list] = {}
    seen: dict[int, int] = {}
    for block in blocks:
        layer = seen.get(block.number, 0)
        seen[block.number] = layer + 1
        slots = out.setdefault((block.number // size, layer), [None] * size)
        slots[block.number % size] = block
    return [Group(number, tuple(slots)) for (number, _), slots in out.items()]


class BlockNoise(Messenger):
    """Draws each latent site's Gaussian noise block by block, from each block's own
    generator (zeros for filler blocks), for a group run under the particles plate."""

    def __init__(self, group: Group, seed: int, sample_block: int, device):
        super().__init__()
        self.generators = [None if block is None else
                           generator(seed, block.number, sample_block, device=device)
                           for block in group.members]

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        fn = msg["fn"]
        if not draws_gaussian_noise(fn):
            raise RuntimeError(
                f"site {msg['name']!r} does not draw Gaussian noise ({type(fn).__name__}) "
                "although the proposal's first trace did: a program whose sites change "
                "from call to call cannot be evaluated in groups of blocks")
        if isinstance(_leaf(fn), Delta):
            return  # draws nothing: Pyro takes its value
        msg["value"] = self._rsample(fn)
        msg["done"] = True

    def _rsample(self, fn) -> Tensor:
        if isinstance(fn, Independent):
            return self._rsample(fn.base_dist)
        if isinstance(fn, TransformedDistribution):
            value = self._rsample(fn.base_dist)
            for transform in fn.transforms:
                value = transform(value)
            return value
        shape = fn.batch_shape + fn.event_shape
        eps = self._noise(shape, fn.loc.dtype, fn.loc.device)
        if isinstance(fn, MultivariateNormal):
            return fn.loc + (fn._unbroadcasted_scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        if torch.is_grad_enabled():
            return fn.loc + eps * fn.scale
        # The same numbers (loc + eps * scale), in the noise's own array.
        return in_place(torch.Tensor.add_, in_place(torch.Tensor.mul_, eps, fn.scale), fn.loc)

    def _noise(self, shape, dtype, device) -> Tensor:
        """Standard normal noise of ``shape`` = (particles, rows, ...), block by block."""
        if len(shape) < 2 or shape[1] != len(self.generators) * ROW_BLOCK:
            raise RuntimeError(f"a latent draw of shape {tuple(shape)} is not (particles, "
                               f"{len(self.generators) * ROW_BLOCK} rows, ...)")
        part = (shape[0], ROW_BLOCK, *shape[2:])
        return torch.cat([torch.zeros(part, dtype=dtype, device=device) if g is None else
                          torch.empty(part, dtype=dtype, device=device).normal_(generator=g)
                          for g in self.generators], dim=1)


def _leaf(fn):
    while isinstance(fn, (Independent, TransformedDistribution)):
        fn = fn.base_dist
    return fn
