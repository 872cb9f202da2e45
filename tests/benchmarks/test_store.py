"""The benchmarks' JSON store: resumable, and shared safely by several processes."""

import json
import multiprocessing
import time

from benchmarks.store import Store


def _write_keys(path, prefix, count, barrier):
    store = Store(path)  # both read the (empty) file before either writes
    barrier.wait()
    for i in range(count):
        store.run(f"{prefix}/{i}", lambda i=i: {"value": i})
        time.sleep(0.005)  # interleave the two writers


def test_a_key_already_stored_is_not_measured_again(tmp_path):
    path = tmp_path / "results.json"
    Store(path).run("a", lambda: {"value": 1})
    calls = []
    Store(path).run("a", lambda: calls.append(1) or {"value": 2})
    assert calls == [] and json.loads(path.read_text())["a"]["value"] == 1


def test_two_processes_writing_one_store_lose_nothing(tmp_path):
    # Each process holds its own copy of the results; without the lock and the re-read,
    # the last writer's copy would drop the other's keys.
    path = tmp_path / "results.json"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_keys, args=(path, p, 25, barrier)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    results = json.loads(path.read_text())
    assert set(results) == {f"{p}/{i}" for p in ("a", "b") for i in range(25)}
