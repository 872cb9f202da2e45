"""The command refuses before the work, writes strict JSON, and runs never collide
(issue 20, sections 4 and 5)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ppl_vae import cli

TINY = ["--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--num-samples", "10",
        "--eval-limit", "10", "--quiet"]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the run was checked")

    monkeypatch.setattr(cli.training, "train", refuse)
    monkeypatch.setattr(cli.ppl_vae, "fit", refuse)


def fails_in_one_line(argv, capsys, *expected) -> str:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert err.startswith("ppl-vae: error:") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


# ------------------------------------------------------------- refused before the work


def test_fit_with_a_delta_guide_is_refused_before_training(tmp_path, capsys, no_training):
    # Before: the whole run trained and wrote its checkpoint, then exit 2 at evaluation.
    fails_in_one_line(["fit", *TINY, "--guide", "delta", "--out", str(tmp_path)], capsys,
                      "--guide delta", "point mass")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_gaps_with_exact_log_px_on_the_vae_is_refused_before_training(tmp_path, capsys,
                                                                        no_training):
    fails_in_one_line(["gaps", *TINY, "--log-px", "exact", "--out", str(tmp_path)], capsys,
                      "--log-px exact", "--model vae")


@pytest.mark.parametrize("device, expected", [
    ("tpu", "--device takes cpu, cuda or cuda:N, got 'tpu'"),
    ("cuda:", "--device takes cpu, cuda or cuda:N"),
])
def test_a_device_that_is_no_device_is_refused_before_training(tmp_path, capsys, no_training,
                                                               device, expected):
    fails_in_one_line(["gaps", *TINY, "--device", device, "--out", str(tmp_path)], capsys,
                      expected)


def test_cuda_without_a_gpu_is_refused_before_training(tmp_path, capsys, no_training,
                                                       monkeypatch):
    monkeypatch.setattr(cli.plan.torch.cuda, "is_available", lambda: False)
    for command in ("gaps", "fit", "surgery"):
        fails_in_one_line([command, *TINY, "--device", "cuda", "--out", str(tmp_path)],
                          capsys, "--device cuda: torch sees no CUDA device here")


def test_cuda_under_torchrun_is_refused_before_training(tmp_path, capsys, no_training,
                                                        monkeypatch):
    monkeypatch.setattr(cli.plan.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli.plan.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    fails_in_one_line(["fit", *TINY, "--device", "cuda:1", "--out", str(tmp_path)], capsys,
                      "there are 1 CUDA devices")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli.entry.dist, "is_initialized", lambda: True)  # no real group
    fails_in_one_line(["fit", *TINY, "--device", "cuda", "--out", str(tmp_path)], capsys,
                      "under torchrun", "gloo")


def test_device_cpu_is_the_default_run(tmp_path):
    given = cli.run(["fit", *TINY, "--device", "cpu", "--out", str(tmp_path / "a")])
    default = cli.run(["fit", *TINY, "--out", str(tmp_path / "b")])
    same = [key for key in default if key != "train_seconds"]
    assert len(same) > 5
    for key in same:  # equal numbers (NaN where both are NaN)
        assert np.array_equal(given[key], default[key], equal_nan=True), key


def test_exact_log_px_on_a_linear_gaussian_model_is_accepted(tmp_path):
    report = cli.run(["gaps", *TINY, "--model", "ppca", "--guide", "linear", "--log-px",
                      "exact", "--out", str(tmp_path)])
    assert report["log_px_method"] == "exact"


def idx_bytes(images: np.ndarray) -> bytes:
    header = (2051).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in images.shape)
    return header + images.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_root(tmp_path, monkeypatch):
    """A small MNIST in IDX files: 40 training and 20 test images of 4x4 pixels."""
    monkeypatch.delenv("PPL_VAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing from the cache
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, size=(n, 4, 4))
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    return root


@pytest.mark.parametrize("command", ["fit", "gaps"])
def test_a_truncated_test_file_is_refused_before_training(mnist_root, tmp_path, capsys,
                                                          no_training, command):
    # Before: 88 s of training on MNIST, then the test file failed to read.
    test_file = mnist_root / "t10k-images-idx3-ubyte.gz"
    data = test_file.read_bytes()
    test_file.write_bytes(data[: len(data) // 2])
    fails_in_one_line([command, *TINY, "--dataset", "mnist", "--data-root", str(mnist_root),
                       "--out", str(tmp_path / "out")], capsys, str(test_file))


def test_a_test_split_of_another_width_is_refused_before_training(mnist_root, tmp_path,
                                                                  capsys, no_training):
    images = np.zeros((20, 5, 5))
    (mnist_root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    fails_in_one_line(["fit", *TINY, "--dataset", "mnist", "--data-root", str(mnist_root),
                       "--out", str(tmp_path / "out")], capsys, "25 columns", "16")


def test_the_small_mnist_trains_when_its_files_are_whole(mnist_root, tmp_path):
    summary = cli.run(["fit", *TINY, "--dataset", "mnist", "--data-root", str(mnist_root),
                       "--out", str(tmp_path / "out")])
    assert summary["test_points"] == 10 and np.isfinite(summary["log_marginal"])


# ------------------------------------------------------------------------ strict JSON


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as jq and JavaScript do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_fit_json_is_strict_json_with_null_for_non_finite_numbers(tmp_path):
    # Two importance samples: k-hat cannot be fitted (inf or NaN in the summary).
    summary = cli.run(["fit", *TINY, "--num-samples", "2", "--out", str(tmp_path)])
    non_finite = [k for k, v in summary.items()
                  if isinstance(v, float) and not np.isfinite(v)]
    assert non_finite, summary  # the case the file must survive
    saved = strict_loads((tmp_path / "fit.json").read_text())
    assert all(saved[k] is None for k in non_finite)
    assert saved["elbo"] == summary["elbo"]


def test_gaps_json_is_strict_json_and_reads_back(tmp_path):
    from ppl_vae import GapReport

    cli.run(["gaps", *TINY, "--num-samples", "2", "--out", str(tmp_path)])
    text = (tmp_path / "gaps.json").read_text()
    saved = strict_loads(text)
    assert saved["khat_max"] is None or np.isfinite(saved["khat_max"])
    assert None in saved["per_datapoint"]["khat"]  # NaN/inf k-hat of two samples
    back = GapReport.from_json(text)
    assert np.isnan(back.per_datapoint["khat"].numpy()).any()
    assert back.log_px == saved["log_px"]


# --------------------------------------------------------------- runs that never collide


HOLD = """
import sys, time
from pathlib import Path
from ppl_vae import cli
cli.check_writable(Path(sys.argv[1]))
with cli.exclusive(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys,
                                                                    no_training):
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        fails_in_one_line(["fit", *TINY, "--out", str(tmp_path)], capsys,
                          f"pid {first.pid}", "in use")
    finally:
        first.kill()
        first.wait()


def test_two_fit_processes_on_one_out_the_second_exits_2(tmp_path):
    # Two real `ppl-vae fit` processes: the first trains long enough to be caught.
    command = [sys.executable, "-m", "ppl_vae.cli", "fit", *TINY, "--epochs", "100000",
               "--out", str(tmp_path)]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / cli.LOCK_FILE
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()  # even a killed run leaves no stale lock: the kernel drops it
        first.wait(timeout=60)
    with cli.exclusive(tmp_path):  # a ValueError if it were still held
        pass


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_a_dangling_symlink_as_out_says_so(tmp_path, capsys, no_training):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    fails_in_one_line(["fit", *TINY, "--out", str(link)], capsys, "dangling symlink",
                      str(tmp_path / "gone"))
    fails_in_one_line(["fit", *TINY, "--out", str(link / "inner")], capsys,
                      f"lies under {link}", "dangling symlink")
