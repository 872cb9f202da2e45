"""Where the MNIST-family files are: looked up on disk, else downloaded with their md5 checked.

The lookup order is ``root=``, then ``$PPL_VAE_DATA``, then the cache directory
``$XDG_CACHE_HOME/ppl_vae``; in each, the dataset's own subfolder before the directory
itself. Files are downloaded into the cache only when they are found nowhere.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are on disk nowhere and could not be downloaded."""


@dataclass(frozen=True)
class Source:
    """Where a file-backed dataset comes from and how to check what was fetched.

    ``md5`` maps each downloadable file name to the md5 of its bytes as served
    (for the binarized MNIST ``.amat`` files: of the uncompressed text).
    """

    splits: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs, tried in order
    md5: dict[str, str]
    has_labels: bool = True


SOURCES: dict[str, Source] = {
    "mnist": Source(
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
    "fashion_mnist": Source(
        splits=("train", "test"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "binarized_mnist": Source(
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

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_DOWNLOAD_TIMEOUT_S = 10.0


def needed_files(name: str, split: str, need_labels: bool) -> list[tuple[str, ...]]:
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


def first_existing(directory: Path, alternatives: tuple[str, ...]) -> Path | None:
    for filename in alternatives:
        if (directory / filename).is_file():
            return directory / filename
    return None


def find_directory(name: str, items, root) -> Path | None:
    for directory in _candidate_dirs(name, root):
        if all(first_existing(directory, alts) for alts in items):
            return directory
    return None


# --------------------------------------------------------------------- download


def fetch(name, split, items, root, download) -> Path:
    """Download the missing files into the cache; raise if that is not possible."""
    target = _cache_dir() / name
    source = SOURCES[name]
    failures = []
    for alternatives in items:
        if first_existing(target, alternatives) is not None:
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


def _download(filename: str, source: Source, target: Path) -> str | None:
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
