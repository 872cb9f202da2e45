"""A JSON file of results by key, so that long benchmarks can be stopped and resumed."""

from __future__ import annotations

import fcntl
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from ppl_vae.json_output import dumps


class Store:
    """Results by key in a JSON file; a key already there is not measured again.

    Each result is written atomically (a temporary file, then ``replace``) as soon as it
    is measured, with the seconds it took. Several processes may share one store (say,
    one per model on a 2-core machine): a write holds a lock on ``<file>.lock``, reads
    the file again and adds its key to what the others wrote meanwhile. The file is
    strict JSON (``null`` for NaN and +-inf); read back, a ``null`` inside a list of
    numbers is NaN again (per-datapoint values), a ``null`` elsewhere stays None.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.results = _read(self.path) if self.path.exists() else {}

    def run(self, key: str, measure) -> None:
        if key in self.results:
            return
        start = time.perf_counter()
        value = measure()
        value["seconds"] = time.perf_counter() - start
        with self._locked():
            if self.path.exists():
                self.results = {**_read(self.path), **self.results}
            self.results[key] = value
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(dumps(self.results, indent=1))
            tmp.replace(self.path)
        brief = {k: v for k, v in value.items() if not isinstance(v, (list, dict))}
        print(key, dumps(brief), flush=True)

    @contextmanager
    def _locked(self):
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    return _nan_in_lists(json.loads(path.read_text()))


def _nan_in_lists(value):
    if isinstance(value, dict):
        return {k: _nan_in_lists(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(v is None or isinstance(v, (int, float)) for v in value):
            return [math.nan if v is None else v for v in value]
        return [_nan_in_lists(v) for v in value]
    return value


def opened(args, filename: str) -> tuple[Path, Store]:
    """A benchmark's start: ``args.threads`` torch threads, the folder ``args.out``
    created, and the Store of ``filename`` in it."""
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, Store(out / filename)
