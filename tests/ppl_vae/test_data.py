"""Tests of ppl_vae.data: the dataset loaders and sampling a synthetic dataset."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import math
import shutil
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from ppl_vae import data_sources
from ppl_vae.data import DatasetNotFoundError, dynamic_binarize, load_dataset
from ppl_vae.simulate import sample_from_model

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared data at {SHARED}")

# From shared/data/README.md: sha256 of the test array's C-order uint8 bytes.
BINARIZED_TEST_SHA256 = "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86"
# Published class counts of the MNIST test set.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path, monkeypatch):
    """No test reads or writes the user's cache or $PPL_VAE_DATA, nor the network."""
    monkeypatch.delenv("PPL_VAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def _row_index(full: torch.Tensor) -> dict[bytes, int]:
    return {row.tobytes(): i for i, row in reversed(list(enumerate(full.numpy())))}


# ------------------------------------------------------------------------ digits


def test_digits_shapes_range_and_labels():
    for split, n in (("train", 1497), ("test", 300)):
        x, y = load_dataset("digits", split, return_labels=True)
        assert x.shape == (n, 64) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() == 1.0
        assert y.shape == (n,) and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10))


def test_digits_split_is_the_documented_permutation():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(len(bunch.data))
    train, y_train = load_dataset("digits", "train", return_labels=True)
    test, y_test = load_dataset("digits", "test", return_labels=True)
    # Disjoint and covering: together they are one permutation of all rows.
    expected = torch.from_numpy(bunch.data[perm] / 16).float()
    assert torch.equal(torch.cat([train, test]), expected)
    assert torch.equal(torch.cat([y_train, y_test]), torch.from_numpy(bunch.target[perm]))
    assert torch.equal(load_dataset("digits", "train"), train)


# ------------------------------------------------------------------ MNIST family


@needs_shared
def test_mnist_train_and_test():
    x, y = load_dataset("mnist", "train", root=SHARED, return_labels=True)
    assert x.shape == (60000, 784) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.dtype == torch.int64 and y[:5].tolist() == [5, 0, 4, 1, 9]
    # The well-known normalization constant of MNIST: mean pixel 0.1307.
    assert abs(x.mean().item() - 0.13066) < 1e-4
    x, y = load_dataset("mnist", "test", root=SHARED, return_labels=True)
    assert x.shape == (10000, 784) and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.bincount(y).tolist() == MNIST_TEST_COUNTS


@needs_shared
def test_fashion_mnist_test():
    x, y = load_dataset("fashion_mnist", "test", root=SHARED, return_labels=True)
    assert x.shape == (10000, 784) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.bincount(y).tolist() == [1000] * 10


@needs_shared
def test_binarized_mnist_splits():
    for split, n in (("train", 50000), ("valid", 10000), ("test", 10000)):
        x = load_dataset("binarized_mnist", split, root=SHARED)
        assert x.shape == (n, 784) and x.dtype == torch.float32
        assert ((x == 0) | (x == 1)).all() and 0 < x.mean() < 1  # both values occur


@needs_shared
def test_binarized_mnist_amat_equals_npz(tmp_path):
    # Only the .amat.gz in root: forces the text parser.
    shutil.copy(SHARED / "binarized_mnist" / "binarized_mnist_test.amat.gz", tmp_path)
    from_amat = load_dataset("binarized_mnist", "test", root=tmp_path)
    from_npz = load_dataset("binarized_mnist", "test", root=SHARED)
    assert torch.equal(from_amat, from_npz)
    digest = hashlib.sha256(from_amat.numpy().astype(np.uint8).tobytes()).hexdigest()
    assert digest == BINARIZED_TEST_SHA256


@needs_shared
def test_lookup_env_var_and_dataset_subfolder(monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(SHARED))
    from_env = load_dataset("mnist", "test")
    assert from_env.shape == (10000, 784)
    assert torch.equal(load_dataset("mnist", "test", root=SHARED / "mnist"), from_env)
    # root= wins over $PPL_VAE_DATA: the fashion files are found under root.
    fashion = load_dataset("fashion_mnist", "test", root=SHARED / "fashion_mnist")
    assert not torch.equal(fashion, from_env)


# ------------------------------------------------------------------------- limit


@needs_shared
def test_limit_is_a_fixed_random_subset():
    full = load_dataset("mnist", "test", root=SHARED)
    x, y = load_dataset("mnist", "test", root=SHARED, limit=1000, return_labels=True)
    assert x.shape == (1000, 784) and y.shape == (1000,)
    assert set(y.tolist()) == set(range(10))
    where = _row_index(full)
    idx = [where[row.tobytes()] for row in x.numpy()]
    assert idx != list(range(1000))
    assert (np.diff(idx) > 0).all()  # kept in dataset order
    again, y_again = load_dataset("mnist", "test", root=SHARED, limit=1000, return_labels=True)
    assert torch.equal(again, x) and torch.equal(y_again, y)
    other = load_dataset("mnist", "test", root=SHARED, limit=1000, seed=1)
    assert not torch.equal(other, x)
    assert torch.equal(load_dataset("mnist", "test", root=SHARED, limit=10**6), full)


# ------------------------------------------------------------------ binarization


def test_static_binarization():
    p = load_dataset("digits", "train")
    b = load_dataset("digits", "train", binarize="static")
    assert b.shape == p.shape and b.dtype == torch.float32
    assert set(torch.unique(b).tolist()) <= {0.0, 1.0}
    assert torch.equal(load_dataset("digits", "train", binarize="static"), b)
    assert not torch.equal(load_dataset("digits", "train", binarize="static", seed=1), b)
    # Bernoulli pixels are independent: the standard error of their mean.
    stderr = math.sqrt(float((p * (1 - p)).sum())) / p.numel()
    assert abs(b.mean().item() - p.mean().item()) < 5 * stderr
    # A row's pixels do not depend on limit.
    full = _row_index(p)
    sub_p = load_dataset("digits", "train", limit=100)
    sub_b = load_dataset("digits", "train", binarize="static", limit=100)
    rows = torch.tensor([full[row.tobytes()] for row in sub_p.numpy()])
    assert torch.equal(sub_b, b[rows])


def test_dynamic_binarization():
    p = load_dataset("digits", "test")
    assert torch.equal(load_dataset("digits", "test", binarize="dynamic"), p)
    first = dynamic_binarize(p, torch.Generator().manual_seed(3))
    assert set(torch.unique(first).tolist()) <= {0.0, 1.0}
    assert torch.equal(dynamic_binarize(p, torch.Generator().manual_seed(3)), first)
    assert not torch.equal(dynamic_binarize(p, torch.Generator().manual_seed(4)), first)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dynamic_binarize(p * 2)


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar10"}, r"name='cifar10'.*digits, mnist, fashion_mnist, binarized_mnist"),
        ({"name": "digits", "split": "valid"}, r"split='valid'.*train, test"),
        ({"name": "binarized_mnist", "split": "val"}, r"split='val'.*train, valid, test"),
        ({"name": "digits", "binarize": "yes"}, r"binarize.*'yes'"),
        ({"name": "digits", "binarize": True}, r"binarize.*True"),
        ({"name": "digits", "limit": 0}, r"limit.*0"),
        ({"name": "digits", "limit": 2.5}, r"limit.*2\.5"),
        ({"name": "binarized_mnist", "return_labels": True}, r"return_labels.*no labels"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    # root points at an empty directory: the arguments fail before any file lookup.
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs, root=tmp_path, download=False)


def test_missing_files_offline(tmp_path, monkeypatch):
    empty_root, empty_env = tmp_path / "root", tmp_path / "env"
    empty_root.mkdir()
    empty_env.mkdir()
    monkeypatch.setenv("PPL_VAE_DATA", str(empty_env))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "test", root=empty_root, return_labels=True, download=False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needed in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert needed in message
    for place in (empty_root, empty_env, tmp_path / "xdg_cache" / "ppl_vae" / "mnist"):
        assert str(place) in message
    assert "root=" in message and "$PPL_VAE_DATA" in message
    with pytest.raises(DatasetNotFoundError, match="binarized_mnist_valid.amat"):
        load_dataset("binarized_mnist", "valid", root=empty_root, download=False)


def _write(directory: Path, name: str, payload: bytes) -> Path:
    # A fresh directory per variant: a rewrite within one clock tick could keep the
    # file's mtime and size, which the in-memory cache keys on.
    directory.mkdir()
    path = directory / name
    path.write_bytes(gzip.compress(payload) if name.endswith(".gz") else payload)
    return directory


def test_corrupt_idx_files(tmp_path):
    name = "t10k-images-idx3-ubyte.gz"
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 3, 3))
    good = _write(tmp_path / "good", name, header + bytes(18))
    assert load_dataset("mnist", "test", root=good).shape == (2, 9)
    short = _write(tmp_path / "short", name, header + bytes(17))
    with pytest.raises(ValueError, match="corrupt IDX"):
        load_dataset("mnist", "test", root=short)
    labels = _write(tmp_path / "labels", name, (2049).to_bytes(4, "big") + bytes(20))
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        load_dataset("mnist", "test", root=labels)
    not_gzip = _write(tmp_path / "not_gzip", name.removesuffix(".gz"), b"")
    (not_gzip / name).write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="corrupt gzip"):
        load_dataset("mnist", "test", root=not_gzip)


def test_corrupt_amat_file(tmp_path):
    name = "binarized_mnist_valid.amat"
    good = _write(tmp_path / "good", name, b"0 1 1\n1 0 0\n")
    x = load_dataset("binarized_mnist", "valid", root=good)
    assert x.tolist() == [[0, 1, 1], [1, 0, 0]]
    ragged = _write(tmp_path / "ragged", name, b"0 1 1\n1 0\n")
    with pytest.raises(ValueError, match="same number of values"):
        load_dataset("binarized_mnist", "valid", root=ragged)
    not_binary = _write(tmp_path / "not_binary", name, b"0 1 2\n1 0 0\n")
    with pytest.raises(ValueError, match="corrupt .amat"):
        load_dataset("binarized_mnist", "valid", root=not_binary)


# ---------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_mirror():
    """An HTTP server on localhost serving the shared MNIST and Fashion-MNIST files."""
    handler = partial(_QuietHandler, directory=str(SHARED))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@needs_shared
def test_download_into_cache_with_md5_check(local_mirror, tmp_path, monkeypatch):
    mnist = data_sources.SOURCES["mnist"]
    # A dead mirror first: the next one is tried.
    mirrors = ("http://127.0.0.1:1/", local_mirror + "mnist/")
    monkeypatch.setitem(data_sources.SOURCES, "mnist", replace(mnist, mirrors=mirrors))
    x, y = load_dataset("mnist", "test", root=tmp_path / "nothing", return_labels=True)
    cached = tmp_path / "xdg_cache" / "ppl_vae" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    expected, expected_y = load_dataset("mnist", "test", root=SHARED, return_labels=True)
    assert torch.equal(x, expected) and torch.equal(y, expected_y)


@needs_shared
def test_download_rejects_a_wrong_md5(local_mirror, tmp_path, monkeypatch):
    # Fashion-MNIST's files served under MNIST's names: same names, other bytes.
    wrong = replace(data_sources.SOURCES["mnist"], mirrors=(local_mirror + "fashion_mnist/",))
    monkeypatch.setitem(data_sources.SOURCES, "mnist", wrong)
    with pytest.raises(DatasetNotFoundError, match="md5"):
        load_dataset("mnist", "test", root=tmp_path / "nothing")
    cached = tmp_path / "xdg_cache" / "ppl_vae" / "mnist"
    assert list(cached.iterdir()) == []  # no partial or unverified file left behind


# --------------------------------------------------------------- synthetic data


class _LinearGaussian(PyroModule):
    """z ~ N(0, I_k), x ~ N(z W, 0.1^2 I_D); so x ~ N(0, W^T W + 0.01 I)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x=None, idx=None, num_data=None):
        latent_dim = self.weight.shape[0]
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent_dim), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ self.weight, 0.1).to_event(1), obs=x)


def test_sample_from_model_shapes_and_seed():
    model = _LinearGaussian(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]]))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    x, latents = sample_from_model(model, 50, seed=7)
    assert x.shape == (50, 3) and not x.requires_grad
    assert set(latents) == {"z"} and latents["z"].shape == (50, 2)
    # The caller's global RNG stream is left as it was.
    assert torch.equal(torch.get_rng_state(), state)
    x_again, latents_again = sample_from_model(model, 50, seed=7)
    assert torch.equal(x_again, x) and torch.equal(latents_again["z"], latents["z"])
    assert not torch.equal(sample_from_model(model, 50, seed=8)[0], x)


def test_sample_from_model_covariance():
    weight = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    model = _LinearGaussian(weight.float())
    n = 20000
    x, _ = sample_from_model(model, n, seed=0)
    x = x.double()
    sigma = weight.T @ weight + 0.01 * torch.eye(3, dtype=torch.float64)
    empirical = torch.cov(x.T, correction=0)
    # Gaussian data: Var(S_ij) = (sigma_ii sigma_jj + sigma_ij^2) / n; x has mean 0.
    stderr = ((torch.outer(sigma.diag(), sigma.diag()) + sigma**2) / n).sqrt()
    assert ((empirical - sigma).abs() < 5 * stderr).all()
    assert (x.mean(0).abs() < 5 * (sigma.diag() / n).sqrt()).all()


def test_sample_from_model_bad_input():
    model = _LinearGaussian(torch.ones(2, 3))
    with pytest.raises(ValueError, match="num_data"):
        sample_from_model(model, 0)

    class NoX(PyroModule):
        def forward(self, x=None, idx=None, num_data=None):
            with pyro.plate("data", num_data, dim=-1):
                pyro.sample("y", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site named 'x'"):
        sample_from_model(NoX(), 5)


def test_threshold_binarization_sets_pixels_above_one_half():
    x = load_dataset("digits", "train", limit=50)
    b = load_dataset("digits", "train", limit=50, binarize="threshold")
    assert torch.equal(b, (x > 0.5).float())
    assert 0 < b.mean() < 1


# Issue 20, section 4: damaged archives name their path; meta tensors are refused at the
# boundary.


def _npz(directory: Path, **arrays) -> Path:
    directory.mkdir()
    np.savez_compressed(directory / "binarized_mnist.npz", **arrays)
    return directory / "binarized_mnist.npz"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not-a-zip"])
def test_a_damaged_npz_names_its_path_and_what_to_do(tmp_path, damage):
    rng = np.random.default_rng(0)
    path = _npz(tmp_path / damage, test=rng.integers(0, 2, (50, 9), dtype=np.uint8))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":  # inside the compressed array: a CRC or zlib error
        data[len(data) // 3] ^= 0xFF
    else:
        data = bytearray(b"<html>not found</html>")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or truncated .npz") as caught:
        load_dataset("binarized_mnist", "test", root=path.parent)
    assert str(path) in str(caught.value) and "replace it" in str(caught.value)


def test_a_whole_npz_still_loads_and_a_missing_split_is_named(tmp_path):
    bits = np.random.default_rng(1).integers(0, 2, (5, 3), dtype=np.uint8)
    path = _npz(tmp_path / "whole", test=bits)
    assert torch.equal(load_dataset("binarized_mnist", "test", root=path.parent),
                       torch.from_numpy(bits).float())
    with pytest.raises(ValueError, match="no array 'valid'"):
        load_dataset("binarized_mnist", "valid", root=path.parent)


def test_data_on_the_meta_device_is_refused_at_the_boundary():
    import ppl_vae
    from ppl_vae.guides import LinearEncoder
    from ppl_vae.models import PPCA

    model, guide = PPCA(3, 1), LinearEncoder(3, 1)
    x = torch.zeros(4, 3, device="meta")
    for call in (lambda: ppl_vae.log_marginal(model, guide, x, num_samples=2),
                 lambda: ppl_vae.elbo(model, guide, x, num_samples=2),
                 lambda: ppl_vae.fit(model, guide, x, num_steps=1, progress=False),
                 lambda: ppl_vae.gaps(model, guide, x, num_samples=2, progress=False)):
        with pytest.raises(ValueError, match="x is on the meta device"):
            call()
    meta_model = PPCA(3, 1).to("meta")
    with pytest.raises(ValueError, match="model's parameters are on the meta device"):
        ppl_vae.log_marginal(meta_model, guide, torch.zeros(4, 3), num_samples=2)
