"""A damaged checkpoint never loads (issue 20, section 1).

Every checkpoint carries a SHA-256 digest of its content; ``checkpoint.load`` (behind
``fit(resume=True)`` and the command line) refuses a file whose content does not match.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

import ppl_vae
from ppl_vae import checkpoint, cli
from ppl_vae.checkpoint import DIGEST_KEY, CheckpointError, UnverifiedCheckpointWarning
from ppl_vae.guides import MLPEncoder
from ppl_vae.models import VAE

TINY = ["--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--num-samples", "10",
        "--eval-limit", "10", "--quiet"]
STEPS = 4


def build():
    torch.manual_seed(0)
    return VAE(64, 2, hidden=(16,)), MLPEncoder(64, 2, hidden=(16,))


@pytest.fixture(scope="module")
def x():
    return ppl_vae.load_dataset("digits", binarize="static")[:60]


@pytest.fixture(scope="module")
def written(x, tmp_path_factory):
    """A checkpoint of a real (tiny) fit, with its optimizer and RNG state."""
    path = tmp_path_factory.mktemp("fit") / "run.pt"
    ppl_vae.fit(*build(), x, num_steps=STEPS, batch_size=20, seed=0, progress=False,
                checkpoint=path)
    return path


def same(a, b) -> bool:
    """Exact equality of two checkpoint contents: types, dtypes, shapes and every bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bytes(a), _bytes(b)))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(i, j) for i, j in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def flipped(path, offset: int, out):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def record_offsets(path) -> dict[str, tuple[int, int]]:
    """Each zip record's (start, length) of stored bytes (torch.save does not compress)."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    raw = path.read_bytes()
    spans = {}
    for info in infos:
        start = info.header_offset + 30
        name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
        extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
        spans[info.filename] = (start + name_len + extra_len, info.file_size)
    return spans


def changed_keys(original: dict, damaged_path) -> set[str]:
    """Top-level keys whose content torch.load (no digest check) reads differently."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on a mangled pickle header
            raw = torch.load(damaged_path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable is "not a different number"
        return set()
    if not isinstance(raw, dict):
        return set(original)
    raw.pop(DIGEST_KEY, None)
    return {key for key in original if key not in raw or not same(original[key], raw[key])}


def test_a_byte_flipped_anywhere_is_refused_or_changes_nothing(written, tmp_path):
    original = checkpoint.load(written)
    size = written.stat().st_size
    spans = record_offsets(written)
    data_records = [span for name, span in spans.items() if "/data/" in name]
    # Spread over the whole file, plus the middle of every tensor's bytes and of the
    # pickled metadata: weights, Adam's moments, RNG state, history, configuration.
    offsets = set(np.linspace(0, size - 1, 80).astype(int).tolist())
    offsets |= {start + length // 2 for start, length in data_records if length}
    pkl_start, pkl_length = next(span for name, span in spans.items()
                                 if name.endswith("data.pkl"))
    offsets |= set(range(pkl_start, pkl_start + pkl_length, max(1, pkl_length // 20)))
    refused, identical, reached = 0, 0, set()
    for offset in sorted(offsets):
        damaged = flipped(written, offset, tmp_path / f"flip{offset}.pt")
        reached |= changed_keys(original, damaged)
        try:
            loaded = checkpoint.load(damaged)
        except CheckpointError as error:
            assert str(damaged) in str(error)
            refused += 1
            continue
        assert same(loaded, original), f"a flip at byte {offset} of {size} loaded other content"
        identical += 1
    assert refused + identical == len(offsets) >= 100
    # Without the digest these flips would have loaded different weights and optimizer
    # state (what main did): the test reaches the content that matters.
    assert {"model", "guide", "optimizer", "rng", "history"} <= reached, reached
    assert refused >= len(data_records)


def test_a_flip_inside_the_optimizer_state_is_refused(written, tmp_path):
    original = checkpoint.load(written)
    spans = record_offsets(written)
    for name, (start, length) in spans.items():
        if "/data/" not in name or not length:
            continue
        damaged = flipped(written, start + length - 1, tmp_path / "last.pt")
        if changed_keys(original, damaged) == {"optimizer"}:
            with pytest.raises(CheckpointError, match="does not match the SHA-256 digest"):
                checkpoint.load(damaged)
            return
    pytest.fail("no tensor record of the optimizer state found")


def a_weight_flip(written, tmp_path):
    original = checkpoint.load(written)
    for name, (start, length) in record_offsets(written).items():
        if "/data/" in name and length:
            damaged = flipped(written, start + length // 2, tmp_path / "weights.pt")
            if "model" in changed_keys(original, damaged):
                return damaged
    raise AssertionError("no tensor record of the model found")


def test_resume_refuses_a_damaged_checkpoint_and_names_it(written, x, tmp_path):
    damaged = a_weight_flip(written, tmp_path)
    with pytest.raises(CheckpointError, match="damaged") as caught:
        ppl_vae.fit(*build(), x, num_steps=STEPS + 2, batch_size=20, seed=0, progress=False,
                    checkpoint=damaged, resume=True)
    assert str(damaged) in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    cli.run(["fit", *TINY, "--out", str(out)])
    return out / "checkpoint.pt"


def test_the_command_line_refuses_a_damaged_checkpoint_in_one_line(cli_checkpoint, tmp_path):
    damaged = a_weight_flip(cli_checkpoint, tmp_path)
    with pytest.raises(CheckpointError):
        cli.load_checkpoint(damaged)
    done = subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", "gaps", "--checkpoint", str(damaged),
         "--num-samples", "10", "--eval-limit", "10", "--quiet", "--out", str(tmp_path / "g")],
        capture_output=True, text=True,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("ppl-vae: error:") and done.stderr.count("\n") == 1
    assert str(damaged) in done.stderr and "damaged" in done.stderr
    assert not (tmp_path / "g" / "gaps.json").exists()


def test_a_flipped_configuration_is_refused(cli_checkpoint, tmp_path):
    # A flip in the pickled configuration that leaves the networks' shapes alone (say,
    # another seed or lr) would rebuild the same model silently: scan for one.
    start, length = next(span for name, span in record_offsets(cli_checkpoint).items()
                         if name.endswith("data.pkl"))
    original = checkpoint.load(cli_checkpoint)
    shaping = ("model", "guide", "latent_dim", "hidden", "data_dim", "likelihood")
    for offset in range(start, start + length):
        damaged = flipped(cli_checkpoint, offset, tmp_path / "config.pt")
        if changed_keys(original, damaged) != {"config"}:
            continue
        raw = torch.load(damaged, weights_only=True)["config"]
        if isinstance(raw, dict) and all(raw.get(k) == original["config"][k] for k in shaping):
            with pytest.raises(CheckpointError, match="damaged"):
                cli.load_checkpoint(damaged)
            return
    pytest.fail("no byte of the configuration found")


def test_an_old_checkpoint_without_a_digest_loads_with_a_warning(cli_checkpoint, tmp_path):
    state = torch.load(cli_checkpoint, weights_only=True)
    del state[DIGEST_KEY]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.warns(UnverifiedCheckpointWarning, match="cannot be verified"):
        model, guide, cfg = cli.load_checkpoint(old)
    assert cfg.latent_dim == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint with its digest loads silently
        checkpoint.load(cli_checkpoint)


def test_the_digest_sees_dtype_shape_type_and_key_of_every_value():
    base = {"w": torch.arange(6.0).reshape(2, 3), "n": 1, "s": "a", "l": [1, 2.0, None]}
    variants = [
        {**base, "w": torch.arange(6.0, dtype=torch.float64).reshape(2, 3)},
        {**base, "w": torch.arange(6.0).reshape(3, 2)},
        {**base, "w": torch.arange(6.0).reshape(2, 3) + torch.tensor(1e-7)},
        {**base, "n": 1.0}, {**base, "n": True}, {**base, "s": "b"},
        {**base, "l": (1, 2.0, None)}, {**base, "l": [1, 2.0]},
        {"W": base["w"], **{k: v for k, v in base.items() if k != "w"}},
    ]
    digests = {checkpoint.content_digest(v) for v in [base, *variants]}
    assert len(digests) == len(variants) + 1
    # Equal content, built another way (non-contiguous tensor, other key order), agrees.
    other = {"l": [1, 2.0, None], "s": "a", "n": 1,
             "w": torch.arange(6.0).reshape(2, 3).T.contiguous().T}
    assert checkpoint.content_digest(other) == checkpoint.content_digest(base)
    with pytest.raises(TypeError, match="set"):
        checkpoint.content_digest({"bad": {1, 2}})
