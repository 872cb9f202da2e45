"""Checkpoint files: written atomically, verified when read, refused in one clear sentence.

Every checkpoint carries a SHA-256 digest of its content (``DIGEST_KEY``): each tensor's
dtype, shape and bytes, and every other value in a canonical encoding. ``load`` checks it,
so a file damaged after it was written is refused instead of loading different numbers.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ppl_vae.validation import positive_int

# The key under which a checkpoint keeps the digest of the rest of its content.
DIGEST_KEY = "content_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit what it is loaded into."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written without a digest (by an older ppl-vae): it cannot be verified."""


def atomic_save(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save(obj)``, with its content digest, to ``path`` through a temporary file.

    ``os.replace`` swaps the finished file in, so a kill during the write leaves the
    previous checkpoint intact (never a truncated or empty one). The digest (see
    :func:`content_digest`) is stored under ``DIGEST_KEY`` beside ``obj``'s keys.

    Parameters
    ----------
    obj : dict
        Tensors, numbers, strings, None and dicts, lists and tuples of them (what keeps
        it loadable with ``weights_only=True``).
    path : str or PathLike

    Returns
    -------
    Path
        ``path``.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"a checkpoint is a dict, got {type(obj).__name__}")
    if DIGEST_KEY in obj:
        raise ValueError(f"the key {DIGEST_KEY!r} is reserved for the checkpoint's digest")
    obj = {**obj, DIGEST_KEY: content_digest(obj)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint's dict, loaded on the CPU with ``weights_only=True``.

    Parameters
    ----------
    path : str or PathLike
    required : tuple of str
        Keys the dict must hold.

    Raises
    ------
    FileNotFoundError
        When there is no file at ``path``.
    CheckpointError
        When the file is truncated, corrupted, not a checkpoint, lacks a key, or its
        content does not match the digest stored when it was written.

    Warns
    -----
    UnverifiedCheckpointWarning
        When the file has no digest (written before checkpoints carried one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        # torch.load reports damage with many types (even AssertionError and IndexError
        # for a flipped byte in the pickle); all of them mean "unreadable".
        raise CheckpointError(f"{path} is not a readable checkpoint ({_why(error)})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(state).__name__}")
    _verify(state, path)
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: it lacks {missing}")
    return state


def _verify(state: dict, path: Path) -> None:
    """Pop the stored digest and compare it with the content's; warn if there is none."""
    stored = state.pop(DIGEST_KEY, None)
    if stored is None:
        warnings.warn(f"{path} has no content digest (it was written by an older ppl-vae), "
                      "so it cannot be verified; save it again to add one",
                      UnverifiedCheckpointWarning, stacklevel=3)
        return
    try:
        found = content_digest(state)
    except TypeError as error:
        raise CheckpointError(f"{path} is damaged: {error}") from None
    if found != stored:
        raise CheckpointError(
            f"{path} is damaged: its content does not match the SHA-256 digest written "
            "with it (the file changed after it was saved); it was not loaded"
        )


def content_digest(obj) -> str:
    """SHA-256 (hex) of ``obj``'s content, the same for equal content in any process.

    Tensors count by dtype, shape and bytes (each read once, without a copy when it is
    contiguous on the CPU); numbers, strings, None, and dicts (keys sorted), lists and
    tuples by a tagged, length-prefixed encoding, so no two contents share a stream.

    Raises
    ------
    TypeError
        For a value of any other type.
    """
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj) -> None:
    if isinstance(obj, torch.Tensor):
        _feed_tensor(digest, obj)
    elif isinstance(obj, dict):
        _frame(digest, b"d", str(len(obj)).encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        _frame(digest, b"l" if isinstance(obj, list) else b"t", str(len(obj)).encode())
        for item in obj:
            _feed(digest, item)
    else:
        _frame(digest, *_scalar(obj))


def _scalar(value) -> tuple[bytes, bytes]:
    """A tag and the exact bytes of a plain value (bool before int: it is one)."""
    if value is None:
        return b"n", b""
    if isinstance(value, bool):
        return b"b", b"1" if value else b"0"
    if isinstance(value, int):
        return b"i", str(value).encode()
    if isinstance(value, float):
        # float.hex is exact; NaN has one spelling, so equal files hash equal.
        return b"f", (value.hex() if math.isfinite(value) else repr(value)).encode()
    if isinstance(value, str):
        return b"s", value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b"y", value
    raise TypeError(f"a checkpoint holds a {type(value).__name__}, which has no digest")


def _feed_tensor(digest, tensor: torch.Tensor) -> None:
    if tensor.layout != torch.strided:
        raise TypeError(f"a checkpoint holds a {tensor.layout} tensor, which has no digest")
    flat = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    _frame(digest, b"T", f"{flat.dtype}{tuple(tensor.shape)}".encode())
    # A view as bytes works for every dtype (numpy has no bfloat16) and copies nothing.
    _frame(digest, b"B", memoryview(flat.view(torch.uint8).numpy()))


def _frame(digest, tag: bytes, payload) -> None:
    digest.update(tag + len(payload).to_bytes(8, "little"))
    digest.update(payload)


def _why(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "empty or truncated"
    text = str(error)
    if isinstance(error, zipfile.BadZipFile) or "zip archive" in text:
        return "truncated or corrupted"
    if isinstance(error, pickle.UnpicklingError):
        return "not a torch.save file of tensors and plain data"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first[:120]


def load_state(module: torch.nn.Module, state, what: str, path) -> None:
    """``module.load_state_dict(state)``, with a mismatch reported as a CheckpointError."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"the {what} in {path} does not match: {detail}") from error


# What fit keeps in a checkpoint (the command line adds "config" beside them).
FIT_KEYS = ("model", "guide", "optimizer", "step", "num_steps", "rng", "batches", "history",
            "step_seconds", "fit")


@dataclass(frozen=True)
class Saver:
    """Where and when fit writes its checkpoints."""

    path: Path | None
    every: int | None
    extra: dict

    @classmethod
    def checked(cls, checkpoint, every, resume, extra) -> Saver:
        if every is not None:
            every = positive_int(every, "checkpoint_every")
        if checkpoint is None and (every is not None or resume or extra):
            raise ValueError(
                "checkpoint_every, resume and checkpoint_extra need checkpoint=<file>"
            )
        extra = dict(extra or {})
        clash = sorted(set(extra) & {*FIT_KEYS, DIGEST_KEY})
        if clash:
            raise ValueError(f"checkpoint_extra must not use fit's own keys, got {clash}")
        path = Path(checkpoint) if checkpoint is not None else None
        if resume and not path.is_file():
            raise FileNotFoundError(f"resume=True needs a checkpoint, and there is none at {path}")
        return cls(path, every, extra)

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def save(self, run) -> Path | None:
        if self.path is None:
            return None
        return atomic_save({**self.extra, **run.state_dict()}, self.path)
