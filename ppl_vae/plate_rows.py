"""A program's data-plate indices are dataset rows, and what it may index with them.

The engine runs a program on blocks of rows and hands its data plate the rows' dataset
indices, so that a per-datapoint array indexed by the plate, the usual Pyro pattern::

    loc = pyro.param("loc", torch.zeros(N, k))
    with pyro.plate("data", x.shape[0]) as ind:
        pyro.sample("z", dist.Normal(loc[ind], 1.0).to_event(1))

reads each row's own values, as in a call on the whole dataset. The data ``x`` of a call
holds only its block's rows: indexed with those indices it would read other rows, or
none. :func:`checked_indexing` runs a program's boundary trace with the indices marked
(:class:`PlateRows`) and refuses any indexing with them along a dim whose size is not
the dataset's: a silent wrong number otherwise.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# The dataset sizes of the checks under way (innermost last).
_CHECKING: list[int] = []


class PlateRowsError(ValueError):
    """A program indexed something other than a per-datapoint array with its plate."""


class PlateRows(Tensor):
    """Dataset row indices of the data plate, marked: indexing with them (or with
    anything computed from them) is checked while :func:`checked_indexing` runs."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _CHECKING:
            for size, shape in _indexed(func, args, kwargs):
                if size != _CHECKING[-1]:
                    raise PlateRowsError(_message(size, shape, _CHECKING[-1]))
        return super().__torch_function__(func, types, args, kwargs)


@contextlib.contextmanager
def checked_indexing(num_data: int):
    """Refuse indexing with :class:`PlateRows` along a dim that is not ``num_data`` long."""
    _CHECKING.append(num_data)
    try:
        yield
    finally:
        _CHECKING.pop()


def marked(idx: Tensor) -> Tensor:
    """``idx`` as :class:`PlateRows` while a check runs, else itself (no cost)."""
    return idx.as_subclass(PlateRows) if _CHECKING else idx


def _message(size: int, shape, num_data: int) -> str:
    return (
        f"the program indexes an array of shape {tuple(shape)} with its data plate's "
        f"indices along a dim of {size}, not the dataset's {num_data} rows. The library "
        "runs a program on blocks of rows and gives its plate their dataset indices "
        f"(0..{num_data - 1}), which index per-datapoint arrays of {num_data} rows (a "
        "pyro.param made with a row per datapoint), while x holds only the block's rows: "
        "use x itself inside the plate, not x[ind], and create per-datapoint parameters "
        "with the dataset's size, outside the call's x.shape[0] (for some rows of a "
        "dataset, pass idx= and num_data=)"
    )


# Functions that index their first argument along dim args[1] with a later argument.
_ALONG_DIM = {"index_select", "gather", "index_add", "index_add_", "index_copy",
              "index_copy_", "index_fill", "index_fill_", "index_reduce", "index_reduce_",
              "scatter", "scatter_", "scatter_add", "scatter_add_", "take_along_dim"}


def _indexed(func, args, kwargs):
    """(size of the indexed dim, shape of the indexed tensor) for each use of marked
    indices as an index by ``func``."""
    name = getattr(func, "__name__", "")
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_"):
        tensor, key = args[0], args[1] if len(args) > 1 else kwargs.get("indices")
        if isinstance(tensor, Tensor):
            yield from _key_dims(tensor, key)
    elif name in _ALONG_DIM and len(args) >= 3 and isinstance(args[0], Tensor):
        if any(isinstance(a, PlateRows) for a in args[2:]) and isinstance(args[1], int):
            yield args[0].shape[args[1]], args[0].shape
    elif name == "take" and len(args) >= 2 and isinstance(args[1], PlateRows):
        yield args[0].numel(), args[0].shape
    elif name == "embedding" and isinstance(args[0], PlateRows) and len(args) >= 2:
        yield args[1].shape[0], args[1].shape


def _key_dims(tensor: Tensor, key):
    entries = key if isinstance(key, (tuple, list)) and not _is_index_list(key) else (key,)
    consumed = [_consumed(e) for e in entries]
    ellipsis = next((i for i, e in enumerate(entries) if e is Ellipsis), None)
    for i, entry in enumerate(entries):
        if not isinstance(entry, PlateRows):
            continue
        if ellipsis is None or i < ellipsis:
            dim = sum(consumed[:i])
        else:
            dim = tensor.dim() - sum(consumed[i:])
        if 0 <= dim < tensor.dim():
            yield tensor.shape[dim], tensor.shape


def _is_index_list(key) -> bool:
    # A list of ints is one advanced index (x[[0, 2]]), not a tuple of per-dim keys.
    return isinstance(key, list) and all(isinstance(k, int) for k in key)


def _consumed(entry) -> int:
    if entry is None or entry is Ellipsis:
        return 0
    if isinstance(entry, Tensor) and entry.dtype == torch.bool:
        return entry.dim()
    return 1
