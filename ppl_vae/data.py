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
    name : str
        One of ``"digits"``, ``"mnist"``, ``"fashion_mnist"``, ``"binarized_mnist"``.

        - ``"digits"``: the 8x8 digits shipped with scikit-learn (no download),
          pixel values / 16, D = 64; the library's embedded default. The split is
          fixed: the 1797 rows are permuted by
          ``numpy.random.default_rng(0).permutation(1797)``; the first 1497 rows of
          that permutation (in that order) are ``"train"``, the last 300 ``"test"``.
        - ``"mnist"``, ``"fashion_mnist"``: the original gzip IDX files, splits
          ``"train"`` (60000) and ``"test"`` (10000), pixel values / 255, D = 784.
        - ``"binarized_mnist"``: Larochelle & Murray's static binarization, splits
          ``"train"``/``"valid"``/``"test"`` (50000/10000/10000), values in {0, 1},
          D = 784. Read from ``binarized_mnist.npz`` (keys train/valid/test) or else
          ``binarized_mnist_{split}.amat.gz`` / ``.amat``. It has no labels. Its test
          split is sorted by class: evaluate on ``limit=`` rows, never a prefix.

        For synthetic data drawn from a model use :func:`ppl_vae.sample_from_model`.
    split : str
        Which split; see ``name``.
    root : str or os.PathLike, optional
        Directory searched first for the files. The search order is ``root``, then
        ``$PPL_VAE_DATA``, then ``$XDG_CACHE_HOME/ppl_vae`` (default
        ``~/.cache/ppl_vae``). In each, the subfolder named after the dataset
        (e.g. ``mnist/``) is tried before the directory itself, and the first
        directory holding every needed file is used.
    binarize : {None, "static", "dynamic", "threshold"}
        ``None`` returns the intensities. ``"static"`` draws Bernoulli(x) once with a
        ``torch.Generator`` seeded by ``seed``: the same binary data on every call,
        and the same pixels for a row whatever ``limit`` is. ``"dynamic"`` returns the
        intensities unchanged: pass ``binarize="dynamic"`` to ``ppl_vae.fit``, which
        redraws a Bernoulli sample for each minibatch (see :func:`ppl_vae.data.dynamic_binarize`).
        ``"threshold"`` sets a pixel to 1 where its intensity exceeds 0.5
        (``THRESHOLD``), as Cremer et al. binarize Fashion-MNIST. On
        ``binarized_mnist`` binarizing changes nothing.
    limit : int, optional
        Return a fixed random subset of ``limit`` rows (chosen by an rng seeded by
        ``seed``, kept in dataset order), never a prefix. All rows if ``limit >= N``.
    return_labels : bool
        Also return the class labels.
    seed : int
        Seed of the ``limit`` subset and of the static binarization.
    download : bool
        Whether to download missing MNIST-family files into the cache directory.

    Returns
    -------
    x : Tensor of shape (N, D), float32, values in [0, 1]
    y : Tensor of shape (N,), int64
        Only if ``return_labels``.

    Raises
    ------
    ValueError
        Unknown name, split or binarize mode; ``limit`` not a positive int; labels
        asked of ``binarized_mnist``; a corrupt data file.
    ppl_vae.data.DatasetNotFoundError
        (a ``FileNotFoundError``) the files are nowhere and could not be downloaded;
        the message says which files to put in which directory.

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
