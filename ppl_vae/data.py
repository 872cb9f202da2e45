"""Datasets: the embedded digits and the MNIST family.

``load_dataset`` returns images as a float32 Tensor of shape (N, D) with values in
[0, 1]. (Synthetic data drawn from a model: :func:`ppl_vae.simulate.sample_from_model`.)

The MNIST-family files are looked up on disk (``root=``, then ``$PPL_VAE_DATA``, then
the cache directory ``$XDG_CACHE_HOME/ppl_vae``) and downloaded into the cache, with
their md5 checked, only when they are found nowhere (:mod:`ppl_vae.data_sources`); their
formats are read by :mod:`ppl_vae.data_formats`.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ppl_vae.data_formats import read
from ppl_vae.data_sources import (
    SOURCES,
    DatasetNotFoundError,
    fetch,
    find_directory,
    first_existing,
    needed_files,
)
from ppl_vae.validation import one_of, positive_int

__all__ = [
    "DatasetNotFoundError",
    "KNOWN_DATASETS",
    "dynamic_binarize",
    "load_dataset",
]


_DIGITS_SPLITS = ("train", "test")
_DIGITS_TEST_SIZE = 300
KNOWN_DATASETS: tuple[str, ...] = ("digits", *SOURCES)
# Intensity above which binarize="threshold" gives 1.
THRESHOLD = 0.5
_BINARIZE_MODES = (None, "static", "dynamic", "threshold")


# --------------------------------------------------------------------------- public


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    binarize: str | None = None,
    limit: int | None = None,
    return_labels: bool = False,
    seed: int = 0,
    download: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Load a dataset of images as a float32 Tensor of shape (N, D) in [0, 1].

    Parameters
    ----------
    name, split : str
        ``"digits"`` (scikit-learn's 8x8, D = 64), ``"mnist"``, ``"fashion_mnist"`` or
        ``"binarized_mnist"`` (D = 784); splits and files of each: :doc:`data`.
    root, download : optional
        Directory searched first (then ``$PPL_VAE_DATA``, then the cache), and whether
        to download missing MNIST-family files into the cache.
    binarize : {None, "static", "dynamic", "threshold"}
        Intensities, Bernoulli(x) drawn once with ``seed``, intensities for
        ``fit(binarize="dynamic")``, or pixels above 0.5.
    limit, return_labels, seed : optional
        A fixed random subset of ``limit`` rows (never a prefix), the labels, the seed.

    Returns
    -------
    x : Tensor of shape (N, D), float32, values in [0, 1]
    y : Tensor of shape (N,), int64
        Only if ``return_labels``.

    Examples
    --------
    >>> import ppl_vae
    >>> x = ppl_vae.load_dataset("digits", split="test")
    >>> x.shape, float(x.min()), float(x.max())
    (torch.Size([300, 64]), 0.0, 1.0)
    >>> ppl_vae.load_dataset("digits", split="test", binarize="static").unique().tolist()
    [0.0, 1.0]
    """
    _check_args(name, split, binarize, limit, return_labels)
    images, labels, scale = _load_raw(name, split, root, download, return_labels)
    rows = _limit_rows(len(images), limit, seed)
    if binarize == "static":
        # Binarize the whole split before subsetting so a row's pixels do not
        # depend on `limit`.
        x = _static_binarize(_to_unit(images, scale), seed)
        x = x if rows is None else x[torch.from_numpy(rows)]
    else:
        x = _to_unit(images if rows is None else images[rows], scale)
        if binarize == "threshold":
            x = (x > THRESHOLD).to(x.dtype)
    if not return_labels:
        return x
    y = labels if rows is None else labels[rows]
    return x, torch.from_numpy(y.astype(np.int64))


def dynamic_binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw a fresh binary sample Bernoulli(x), as done for each minibatch.

    Parameters
    ----------
    x : Tensor of shape (..., D)
        Intensities in [0, 1].
    generator : torch.Generator, optional
        Source of randomness; the global one if None.

    Returns
    -------
    Tensor of shape (..., D)
        Values in {0, 1}, same dtype as ``x``.
    """
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(
            f"x must hold intensities in [0, 1] to binarize; saw values in "
            f"[{x.min().item()}, {x.max().item()}] (or NaN)"
        )
    return torch.bernoulli(x, generator=generator)


# ----------------------------------------------------------------------- validation


def _splits(name: str) -> tuple[str, ...]:
    return _DIGITS_SPLITS if name == "digits" else SOURCES[name].splits


def _check_args(name, split, binarize, limit, return_labels) -> None:
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset name={name!r}; known names: {', '.join(KNOWN_DATASETS)}")
    if split not in _splits(name):
        raise ValueError(
            f"unknown split={split!r} for dataset {name!r}; "
            f"valid splits: {', '.join(_splits(name))}"
        )
    one_of(binarize, _BINARIZE_MODES, "binarize")
    if limit is not None:
        positive_int(limit, "limit")
    if return_labels and name != "digits" and not SOURCES[name].has_labels:
        raise ValueError(f"return_labels=True, but dataset {name!r} has no labels")


# ------------------------------------------------------------------- transforms


def _limit_rows(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a fixed random subset, or None for all rows."""
    if limit is None or limit >= n:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _to_unit(images: np.ndarray, scale: float) -> Tensor:
    out = images.astype(np.float32)
    out /= scale
    return torch.from_numpy(out)


def _static_binarize(x: Tensor, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


# ---------------------------------------------------------------------- loading


def _load_raw(name, split, root, download, need_labels):
    """Images (N, D) uint8, labels (N,) or None, and the value that maps to 1.0."""
    if name == "digits":
        images, labels = _digits(split)
        return images, labels, 16.0
    items = needed_files(name, split, need_labels)
    directory = find_directory(name, items, root)
    if directory is None:
        directory = fetch(name, split, items, root, download)
    paths = [first_existing(directory, alternatives) for alternatives in items]
    images = read(paths[0], split)
    labels = read(paths[1], split) if need_labels else None
    if labels is not None and len(labels) != len(images):
        raise ValueError(
            f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels"
        )
    return images, labels, 255.0 if name != "binarized_mnist" else 1.0


@lru_cache(maxsize=4)
def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    # Imported here: scikit-learn is slow to import and only digits needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(len(bunch.data))
    n_train = len(perm) - _DIGITS_TEST_SIZE
    rows = perm[:n_train] if split == "train" else perm[n_train:]
    images = bunch.data[rows].astype(np.uint8)
    labels = bunch.target[rows].astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels
