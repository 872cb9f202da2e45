"""Evaluation across processes: shard row blocks over ranks, then gather every row.

When a ``torch.distributed`` process group is initialized with more than one process,
the estimators, AIS and BDMC give each rank every ``world_size``-th block of rows (the
same blocks that fix the random draws, :mod:`ppl_vae.seeding`), and combine the results
with an all-reduce in which every rank contributes only its own rows (others are 0, and
x + 0 == x exactly). Every rank gets the full result, in the original row order, equal
to a one-process call with the same seed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor

_LOCAL_ONLY = [False]


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one (or
    inside :func:`local_only`)."""
    if not _LOCAL_ONLY[0] and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def local_only():
    """Inside, every rank computes everything alone, as one process would.

    For work whose result must equal a one-process call but whose random draws are not
    tied to rows (``refine``'s SVI), and for work that splits its rows by hand
    (``fit_local``, see :mod:`ppl_vae.local_elbo`), fit's own sharding is switched off.
    """
    previous = _LOCAL_ONLY[0]
    _LOCAL_ONLY[0] = True
    try:
        yield
    finally:
        _LOCAL_ONLY[0] = previous


def is_distributed() -> bool:
    return rank_and_size()[1] > 1


def my_share(items: list) -> list:
    """This rank's items: every world_size-th, starting at its rank."""
    rank, size = rank_and_size()
    return items[rank::size]


def gathered(values: Tensor, mine: Tensor, dim: int = -1) -> Tensor:
    """``values`` with the entries of other ranks filled in (an exact sum of disjoint parts).

    Parameters
    ----------
    values : Tensor
        Valid at the positions ``mine`` along ``dim``; anything elsewhere.
    mine : BoolTensor of shape (values.shape[dim],)
    """
    if not is_distributed():
        return values
    shape = [1] * values.dim()
    shape[dim] = -1
    part = values.masked_fill(~mine.reshape(shape).to(values.device), 0.0).contiguous()
    backend_device = _backend_device()
    summed = part.to(backend_device)
    dist.all_reduce(summed)
    return summed.to(values.device)


def _backend_device() -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(value: float, flag: bool) -> tuple[float, bool]:
    """The mean of ``value`` over ranks and whether any rank raised ``flag`` (one
    all-reduce), so that every rank records the same history and stops at the same step."""
    if not is_distributed():
        return value, flag
    both = torch.tensor([value, float(flag)], dtype=torch.float64, device=_backend_device())
    dist.all_reduce(both)
    return float(both[0]) / rank_and_size()[1], bool(both[1] > 0)


def summed_over_group(value: float) -> float:
    """The sum of ``value`` over every rank of the process group, even inside
    :func:`local_only` (for work that a caller splits over ranks by hand in there)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_backend_device())
    dist.all_reduce(total)
    return float(total[0])


def wrapped(loss_module: torch.nn.Module) -> torch.nn.Module:
    """``loss_module`` in DistributedDataParallel when training runs on several ranks.

    DDP broadcasts rank 0's parameters at construction and averages the gradients of
    every backward pass, so the parameters stay identical across ranks.
    """
    if not is_distributed():
        return loss_module
    from torch.nn.parallel import DistributedDataParallel

    device = next(loss_module.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(loss_module, device_ids=device_ids)
