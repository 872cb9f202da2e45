"""The output folder of a run: writable, held by one run at a time, written by rank 0."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

from ppl_vae.distributed import rank_and_size

LOCK_FILE = ".ppl-vae.lock"


def check_writable(out: Path) -> None:
    """Create ``out`` and write a scratch file in it, or a one-line ValueError."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    for path in (out, *out.parents):
        if path.exists():
            break
        if path.is_symlink():  # it exists as a link, but not what it points to
            what = f"--out {out}" if path == out else f"--out {out} lies under {path}, which"
            raise ValueError(f"{what} is a dangling symlink (to {os.readlink(path)}, which "
                             "does not exist)")
    ancestor = next(parent for parent in (out, *out.parents) if parent.exists())
    if not ancestor.is_dir():
        raise ValueError(f"--out {out} lies under {ancestor}, which is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"--out {out} cannot be written: {error.strerror or error}") from None


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold an exclusive lock on ``out`` (``fcntl.flock`` of ``out/.ppl-vae.lock``) for a
    run, so that two runs never write the same files; the lock file names the holder's
    pid. Another run's lock is a one-line ValueError. Other ranks of a torchrun job
    write nothing and take no lock."""
    if not writer():
        yield
        return
    # Read-write without truncation ("a+" would append every write).
    with os.fdopen(os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644), "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(f"--out {out} is in use by another ppl-vae run (pid {holder}); "
                             "wait for it to end, or give another --out") from None
        # Overwrite in place, then cut: a reader never sees an empty file.
        handle.seek(0)
        handle.write(f"{os.getpid()}\n")
        handle.truncate()
        handle.flush()
        yield  # closing the file releases the lock, also when the process dies


def writer() -> bool:
    """Rank 0 prints and writes; other ranks of a torchrun job only compute."""
    return rank_and_size()[0] == 0


def save_figure(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    ax = report.plot()
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")


