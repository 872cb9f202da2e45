"""The ``ppl-vae`` command keeps the memory it frees (ppl_vae.cli.freed_pages).

Each check runs in a fresh interpreter: glibc's thresholds are per process, and the
test process must keep its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Rounds of six 16 MB temporaries, touched and freed together. Under glibc's default
# thresholds (whatever the interpreter freed before: at most 32 MB, trimming past 64 MB)
# the rounds after the first come from the top of the heap, trimmed when all six are
# freed (96 MB); under the command's settings (trimming past 128 MB) they stay.
_ROUNDS = r"""
import json, resource, sys, torch
from ppl_vae.cli.freed_pages import keep_freed_pages
took = keep_freed_pages() if sys.argv[1] == "keep" else None
def round_():
    blocks = [torch.empty(2**22).fill_(1.0) for _ in range(6)]
    del blocks
for _ in range(2):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"took": took, "faults": faults, "pages": 10 * 6 * 2**22 * 4 // 4096}))
"""


def _rounds(mode: str) -> dict:
    env_free = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* from the caller's environment
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True,
                         text=True, check=True, env=env_free)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_command_process_stops_faulting_in_freed_temporaries():
    # Some runs' heaps cannot grow in place (where the address layout puts them), and
    # then keep their pages anyway: up to three tries for one that shows the faults.
    for _ in range(3):
        plain = _rounds("default")
        if plain["faults"] > plain["pages"] // 2:
            break
    else:
        pytest.skip("this process keeps freed pages already; nothing to compare")
    kept = _rounds("keep")
    assert kept["took"] is True
    # Without the settings every round faults its 24576 pages in again; with them, none.
    assert kept["faults"] < plain["pages"] // 20, (kept, plain)


def test_keep_freed_pages_is_the_console_scripts_first_step(monkeypatch):
    from ppl_vae.cli import entry

    calls = []
    monkeypatch.setattr(entry, "keep_freed_pages", lambda: calls.append("keep"))
    monkeypatch.setattr(entry, "main", lambda argv=None: calls.append("main"))
    entry.console()
    assert calls == ["keep", "main"]
