"""The MNIST-family file formats: gzip IDX, Larochelle's ``.amat`` text, and ``.npz``.

Each is parsed strictly (a truncated or corrupt file is a ValueError naming it), and a
parsed array is cached by path, modification time and size, read-only.
"""

from __future__ import annotations

import gzip
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

_IDX_MAGIC = {"images": 2051, "labels": 2049}


def read(path: Path, split: str) -> np.ndarray:
    """The array of a data file (images (N, D) or labels (N,), uint8) for ``split``."""
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
