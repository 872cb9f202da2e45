"""Checkpoint files: written atomically, read safely, refused in one clear sentence."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit what it is loaded into."""


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder.

    ``os.replace`` swaps the finished file in, so a kill during the write leaves the
    previous checkpoint intact (never a truncated or empty one).

    Parameters
    ----------
    obj : object
        Anything ``torch.save`` takes; tensors, numbers, strings and containers of them
        keep it loadable with ``weights_only=True``.
    path : str or PathLike

    Returns
    -------
    Path
        ``path``.
    """
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
        When the file is truncated, corrupted, not a checkpoint, or lacks a key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError,
            AttributeError, ValueError, TypeError, KeyError) as error:
        # torch.load reports damage with many types; all of them mean "unreadable".
        raise CheckpointError(f"{path} is not a readable checkpoint ({_why(error)})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(state).__name__}")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: it lacks {missing}")
    return state


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
