"""Datasets: the embedded digits and the MNIST family.

``load_dataset`` returns images as a float32 Tensor of shape (N, D) with values in
[0, 1]. (Synthetic data drawn from a model: :func:`ppl_vae.simulate.sample_from_model`.)

The MNIST-family files are looked up on disk (``root=``, then ``$PPL_VAE_DATA``, then
the cache directory ``$XDG_CACHE_HOME/ppl_vae``) and downloaded into the cache, with
their md5 checked, only when they are found nowhere.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ppl_vae.validation import one_of, positive_int

__all__ = [
    "DatasetNotFoundError",
    "KNOWN_DATASETS",
    "dynamic_binarize",
    "load_dataset",
]


@dataclass(frozen=True)
class _Source:
    """Where a file-backed dataset comes from and how to check what was fetched.

    ``md5`` maps each downloadable file name to the md5 of its bytes as served
    (for the binarized MNIST ``.amat`` files: of the uncompressed text).
    """

    splits: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs, tried in order
    md5: dict[str, str]
    has_labels: bool = True


_SOURCES: dict[str, _Source] = {
    "mnist": _Source(
        splits=("train", "test"),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": _Source(
        splits=("train", "test"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "binarized_mnist": _Source(
        splits=("train", "valid", "test"),
        mirrors=("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",),
        md5={
            "binarized_mnist_train.amat": "db28b1a6ae0fe70cbd3da91acf46e477",
            "binarized_mnist_valid.amat": "bf37822a04e94123630de6a7dfd9c9ef",
            "binarized_mnist_test.amat": "14e41ae11040adba6ab8cb291eda0dd8",
        },
        has_labels=False,
    ),
}

_DIGITS_SPLITS = ("train", "test")
_DIGITS_TEST_SIZE = 300
KNOWN_DATASETS: tuple[str, ...] = ("digits", *_SOURCES)
# Intensity above which binarize="threshold" gives 1.
THRESHOLD = 0.5
_BINARIZE_MODES = (None, "static", "dynamic", "threshold")
_IDX_MAGIC = {"images": 2051, "labels": 2049}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_DOWNLOAD_TIMEOUT_S = 10.0


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are on disk nowhere and could not be downloaded."""


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
    return _DIGITS_SPLITS if name == "digits" else _SOURCES[name].splits


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
    if return_labels and name != "digits" and not _SOURCES[name].has_labels:
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
    items = _needed_files(name, split, need_labels)
    directory = _find_directory(name, items, root)
    if directory is None:
        directory = _fetch(name, split, items, root, download)
    paths = [_first_existing(directory, alternatives) for alternatives in items]
    images = _read(paths[0], split)
    labels = _read(paths[1], split) if need_labels else None
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


def _needed_files(name: str, split: str, need_labels: bool) -> list[tuple[str, ...]]:
    """Per needed item, the file names that can provide it, best first."""
    if name == "binarized_mnist":
        amat = f"binarized_mnist_{split}.amat"
        return [("binarized_mnist.npz", amat + ".gz", amat)]
    kinds = ("images-idx3", "labels-idx1") if need_labels else ("images-idx3",)
    gz = [f"{_IDX_PREFIX[split]}-{kind}-ubyte.gz" for kind in kinds]
    # People often gunzip the IDX files; accept those too.
    return [(f, f.removesuffix(".gz")) for f in gz]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ppl_vae"


def _search_bases(root) -> list[Path]:
    bases = [Path(root)] if root is not None else []
    if os.environ.get("PPL_VAE_DATA"):
        bases.append(Path(os.environ["PPL_VAE_DATA"]))
    return [*bases, _cache_dir()]


def _candidate_dirs(name: str, root) -> list[Path]:
    # The dataset's own subfolder first: a base that holds several datasets' files
    # flat is ambiguous (MNIST and Fashion-MNIST share file names).
    return [d for base in _search_bases(root) for d in (base / name, base)]


def _first_existing(directory: Path, alternatives: tuple[str, ...]) -> Path | None:
    for filename in alternatives:
        if (directory / filename).is_file():
            return directory / filename
    return None


def _find_directory(name: str, items, root) -> Path | None:
    for directory in _candidate_dirs(name, root):
        if all(_first_existing(directory, alts) for alts in items):
            return directory
    return None


# --------------------------------------------------------------------- download


def _fetch(name, split, items, root, download) -> Path:
    """Download the missing files into the cache; raise if that is not possible."""
    target = _cache_dir() / name
    source = _SOURCES[name]
    failures = []
    for alternatives in items:
        if _first_existing(target, alternatives) is not None:
            continue
        remote = next(f for f in alternatives if f in source.md5)
        if not download:
            failures.append(f"{remote}: download disabled (download=False)")
            continue
        error = _download(remote, source, target)
        if error:
            failures.append(error)
    if failures:
        raise DatasetNotFoundError(_not_found_message(name, split, items, root, failures))
    return target


def _download(filename: str, source: _Source, target: Path) -> str | None:
    """Fetch one file into ``target``, trying each mirror; an error text or None."""
    errors = []
    for mirror in source.mirrors:
        url = mirror + filename
        try:
            _download_verified(url, source.md5[filename], target / filename)
            return None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            errors.append(f"{url}: {exc}")
    return f"{filename}: download failed ({'; '.join(errors)})"


def _download_verified(url: str, md5: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp file in the same directory and rename, so an interrupted or
    # corrupt download never leaves a file that the lookup would trust.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"md5 {digest.hexdigest()} != expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _not_found_message(name, split, items, root, failures) -> str:
    needed = " and ".join(" or ".join(alts) for alts in items)
    searched = "\n  ".join(str(d) for d in _candidate_dirs(name, root))
    return (
        f"dataset {name!r} split {split!r}: files not found.\n"
        f"Needed, in one directory: {needed}.\n"
        f"Searched (root=, then $PPL_VAE_DATA, then the cache):\n  {searched}\n"
        f"Put the file(s) in one of these directories, e.g. {_cache_dir() / name}, "
        f"or pass root=DIR or set $PPL_VAE_DATA=DIR to a directory holding them "
        f"(directly or in a subfolder {name}/).\n"
        f"Download: " + "; ".join(failures)
    )


# ---------------------------------------------------------------------- parsing


def _read(path: Path, split: str) -> np.ndarray:
    stat = path.stat()
    # mtime and size in the cache key: a replaced file is read again.
    return _read_cached(str(path), split, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _read_cached(path: str, split: str, mtime_ns: int, size: int) -> np.ndarray:
    if path.endswith(".npz"):
        array = _read_npz(path, split)
    elif ".amat" in path:
        array = _parse_amat(_read_bytes(path), path)
    else:
        kind = "labels" if "labels-idx1" in path else "images"
        array = _parse_idx(_read_bytes(path), _IDX_MAGIC[kind], path)
    # Shared by every caller through the cache: make it immutable.
    array.flags.writeable = False
    return array


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x1f\x8b":  # the gzip magic number
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt gzip file ({exc})") from exc


def _parse_idx(data: bytes, magic: int, path: str) -> np.ndarray:
    """Parse an IDX file of uint8: images to (N, rows * cols), labels to (N,)."""
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise ValueError(
            f"{path}: not an IDX file of the expected kind (magic number {found}, expected {magic})"
        )
    ndim = data[3]  # the magic's last byte is the number of dimensions
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: corrupt IDX file: header says shape {dims} ({expected} bytes), "
            f"but {len(data) - header} bytes follow"
        )
    array = np.frombuffer(data, np.uint8, offset=header)
    return array.reshape(dims[0], -1) if ndim > 1 else array


def _parse_amat(data: bytes, path: str) -> np.ndarray:
    """Parse .amat text (rows of space-separated 0/1) to a uint8 array (N, D)."""
    # Vectorized over bytes: np.loadtxt takes about a minute on the train split.
    # Byte classes: 0 = not allowed, 1 = whitespace, 2 = a 0/1 token.
    byte_kind = np.zeros(256, dtype=np.uint8)
    byte_kind[list(b" \t\r\n")] = 1
    byte_kind[list(b"01")] = 2
    buf = np.frombuffer(data, dtype=np.uint8)
    kind = byte_kind[buf]
    if not kind.all():
        pos = int(np.argmin(kind))
        raise ValueError(
            f"{path}: corrupt .amat file: byte {data[pos : pos + 1]!r} at offset {pos}; "
            "expected only 0/1 tokens separated by whitespace"
        )
    is_bit = kind == 2
    if (is_bit[1:] & is_bit[:-1]).any():
        raise ValueError(f"{path}: corrupt .amat file: a token longer than one 0/1")
    line_starts = np.concatenate(([0], np.flatnonzero(buf == ord("\n")) + 1))
    per_line = np.add.reduceat(is_bit, line_starts[line_starts < len(buf)], dtype=np.int64)
    per_line = per_line[per_line > 0]  # blank lines
    if per_line.size == 0 or (per_line != per_line[0]).any():
        raise ValueError(
            f"{path}: corrupt .amat file: rows must all hold the same number of values"
        )
    return (buf[is_bit] - ord("0")).reshape(per_line.size, int(per_line[0]))


def _read_npz(path: str, split: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = archive.files
            array = archive[split] if split in files else None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        # A truncated or damaged archive: numpy lets zipfile's error out with no path.
        raise ValueError(
            f"{path}: corrupt or truncated .npz file ({exc}); replace it with a complete "
            f"copy, or remove it to read binarized_mnist_{split}.amat(.gz) instead"
        ) from exc
    if array is None:
        raise ValueError(f"{path}: no array {split!r}; it holds {files}")
    if array.ndim != 2 or array.dtype != np.uint8 or (array > 1).any():
        raise ValueError(
            f"{path}: array {split!r} must be 0/1 uint8 of shape (N, D); "
            f"got {array.dtype} of shape {array.shape}"
        )
    return array
