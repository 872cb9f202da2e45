"""The speed benchmark's items run, and its plain loops compute what the library computes.

No timing here: the plain references are checked against the library's numbers (paired
differences within their standard error, or exactly where both are deterministic), so
a ratio in ``benchmarks/results/speed.json`` compares two computations of one thing.
"""

import copy
import json
import math
import sys

import pyro
import pytest
import torch

import ppl_vae
from benchmarks import plain_loops as plain
from benchmarks import speed
from benchmarks.ais_small_budget import cremer_ais
from ppl_vae.guides import FlowEncoder, LinearEncoder, MLPEncoder
from ppl_vae.guides.local import LocalDiag, LocalFlow
from ppl_vae.models import PPCA, VAE

TOY = speed.Sizes(data_dim=12, latent=3, hidden=(16,), fit_data=300, fit_steps=4, fit_repeats=1,
                  lm_points=16, lm_k=20, lm_repeats=1, ais_grid=((16, 2, 3),), ais_repeats=1,
                  local_points=4, local_steps=3, local_repeats=1, importance_repeats=1)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).detach()
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model, guide = VAE(12, 3, hidden=(16,)), MLPEncoder(12, 3, hidden=(16,))
    x = speed.binary_data(200, 12, seed=5)
    return model, guide, x


def test_every_item_runs_and_reports_its_ratio_and_bound():
    rate = speed.sgemm_rate(128, repeats=1)
    names = []
    for name, measure in speed.items(TOY):
        r = measure(TOY, rate)
        names.append(name)
        assert r["library_s"] > 0 and r["plain_s"] > 0 and r["gemm_s"] > 0
        assert r["ratio"] == pytest.approx(r["library_s"] / r["plain_s"])
        assert r["library_over_gemm"] == pytest.approx(r["library_s"] / r["gemm_s"])
        assert r["library_faults"] >= 0 and r["plain_faults"] >= 0
    assert names[:3] == ["fit/vae", "fit/ppca", "fit/flow"] and names[-1] == "ais/16x2x3"


def test_page_faults_are_counted_for_each_timer():
    big = 64 * 2**20  # 64 MB: glibc maps it afresh, and writing it faults its pages in

    def touch():
        torch.ones(big // 4)

    timed = speed.best_alternating(lambda: speed.wall(touch), lambda: speed.wall(lambda: None), 2)
    r = speed.figures(timed, 1.0, 1.0)
    # (at least 32 faults even where transparent huge pages map 2 MB at a time)
    assert r["library_faults"] >= 32 and r["plain_faults"] < r["library_faults"]


def test_compare_flags_only_ratios_grown_by_more_than_ten_percent():
    old = {"items": {"a": {"1": {"ratio": 1.0}}, "b": {"1": {"ratio": 1.0}}}}
    new = {"items": {"a": {"1": {"ratio": 1.09}}, "b": {"1": {"ratio": 1.11}},
                     "c": {"1": {"ratio": 9.0}}}}
    grown = speed.compare(new, old)
    assert len(grown) == 1 and grown[0].startswith("b @1t")


def test_plain_vae_elbo_is_the_library_elbo(vae):
    model, guide, x = vae
    torch.manual_seed(1)
    ours = plain.vae_elbo(guide.net, model.decoder, x, torch.randn(200, len(x), 3)).mean(0)
    library = ppl_vae.elbo(model, guide, x, num_samples=200, seed=0)
    mean, se = paired(ours, library)
    assert abs(mean) < 4 * se


def test_plain_flow_elbo_is_the_library_elbo(vae):
    model, _, x = vae
    torch.manual_seed(2)
    guide = FlowEncoder(12, 3, hidden=(16,), num_flows=2)
    with torch.no_grad():  # away from the identity, so the couplings do something
        for p in guide.flows.parameters():
            p.normal_(0, 0.5)
    torch.manual_seed(3)
    eps = torch.randn(200, len(x), 3)
    ours = plain.flow_elbo(guide.net, guide.flows, model.decoder, x, eps).mean(0)
    library = ppl_vae.elbo(model, guide, x, num_samples=200, seed=0)
    mean, se = paired(ours, library)
    assert abs(mean) < 4 * se


def test_plain_ppca_elbo_and_log_marginal_are_the_library_ones():
    torch.manual_seed(4)
    model, guide = PPCA(5, 2, sigma=0.7), LinearEncoder(5, 2)
    with torch.no_grad():
        guide.loc.weight.normal_(0, 0.3)
        guide.raw_scale.fill_(-0.5)
    x = torch.randn(150, 5)
    W, mu, log_sigma = model.W, model.mu, model.sigma_unconstrained
    weight, bias, log_scale = guide.loc.weight, guide.loc.bias, guide.raw_scale
    ours = plain.ppca_elbo(W, mu, log_sigma, weight, bias, log_scale, x,
                           torch.randn(300, len(x), 2)).mean(0)
    mean, se = paired(ours, ppl_vae.elbo(model, guide, x, num_samples=300, seed=0))
    assert abs(mean) < 4 * se
    exact = model.marginal().log_prob(x)
    ours = plain.ppca_log_marginal(W, mu, model.sigma, weight, bias, log_scale.exp(), x, 2000)
    mean, se = paired(ours, exact)
    assert abs(mean) < 4 * se + 1e-3


def test_plain_vae_log_marginal_is_the_library_one(vae):
    model, guide, x = vae
    torch.manual_seed(5)
    ours = plain.vae_log_marginal(guide.net, model.decoder, x, 500)
    mean, se = paired(ours, ppl_vae.log_marginal(model, guide, x, 500, seed=0))
    assert abs(mean) < 4 * se


def test_plain_local_flow_density_is_the_library_one_exactly():
    torch.manual_seed(6)
    guide = LocalFlow(7, 5)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = speed.local_flow_params(guide)
    eps = torch.randn(4, 7, 5)
    u, log_q = plain.local_flow_sample(params, eps)
    q = guide.joint_distribution()
    expected_u = eps
    for transform in q.transforms:
        expected_u = transform(expected_u)
    torch.testing.assert_close(u, expected_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_q, q.log_prob(u), rtol=1e-4, atol=1e-4)


def test_plain_local_fit_reaches_the_elbo_of_fit_local(vae):
    model, _, x = vae
    model, x = copy.deepcopy(model), x[:8]
    with torch.no_grad():  # a sharper likelihood, so the posterior is far from the prior
        for p in model.decoder.parameters():
            p.mul_(4.0)
    for p in model.parameters():
        p.requires_grad_(False)
    elbo_fn, params = speed._local_problem(model, x, "diag")
    torch.manual_seed(7)
    history = plain.local_fit(elbo_fn, params, x, 3, steps=400, particles=8, lr=3e-2)
    assert sum(history[-20:]) / 20 > sum(history[:20]) / 20 + 0.3
    guide = LocalDiag(len(x), 3)
    with torch.no_grad():
        guide.loc.copy_(params[0])
        guide.log_scale.copy_(params[1])
    fitted = ppl_vae.fit_local(model, x, "diag", steps=400, window=400, progress=False, seed=0)
    ours = ppl_vae.elbo(model, guide, x, num_samples=4000, seed=0)
    library = ppl_vae.elbo(model, fitted, x, num_samples=4000, seed=0)
    mean, se = paired(ours, library)
    assert abs(mean) < 4 * se + 0.05


def test_plain_ais_agrees_with_the_library_and_with_importance_sampling(vae):
    model, guide, x = vae
    x = x[:48]
    for p in (*model.parameters(), *guide.parameters()):
        p.requires_grad_(False)
    torch.manual_seed(9)
    loc, scale = plain.gaussian_encoder(guide.net, x)
    ours = plain.vae_ais(model.decoder, loc, scale, x, 50, 8)
    library = ppl_vae.ais(model, x, proposal=guide, num_steps=50, num_chains=8, seed=0,
                          progress=False).log_marginal
    mean, se = paired(ours, library)
    assert abs(mean) < 4 * se + 0.01
    truth = ppl_vae.log_marginal(model, guide, x, 20000, seed=1)
    mean, se = paired(ours, truth)
    assert abs(mean) < 4 * se + 0.02


def test_cremer_style_ais_from_the_prior_reaches_log_px(vae):
    model, guide, x = vae
    x = x[:48]
    pyro.set_rng_seed(10)
    ours = cremer_ais(model.decoder, x, 100, 8, seed=0)
    truth = ppl_vae.log_marginal(model, guide, x, 20000, seed=1)
    mean, se = paired(ours, truth)
    assert abs(mean) < 4 * se + 0.02


def test_kept_pages_runs_in_a_child_whose_glibc_keeps_freed_memory(tmp_path):
    out = tmp_path / "speed.json"
    with pytest.raises(SystemExit) as done:
        speed.main(["--quick", "--kept-pages", "--only", "no-such-item", "--threads", "1",
                    "--json", str(out)])
    assert done.value.code == 0
    meta = json.loads(out.read_text())["quick_kept_pages"]["meta"]
    assert meta["malloc_env"] == speed.KEPT_PAGES


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "mps"])
def test_a_device_other_than_cpu_or_cuda_is_refused(device, capsys):
    with pytest.raises(SystemExit) as done:
        speed.main(["--quick", "--device", device, "--only", "no-such-item"])
    assert done.value.code == 2
    assert "--device takes cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_where_torch_sees_no_gpu(capsys):
    with pytest.raises(SystemExit) as done:
        speed.main(["--quick", "--device", "cuda", "--only", "no-such-item"])
    assert done.value.code == 2
    assert "torch sees no CUDA device here" in capsys.readouterr().err


def test_a_run_records_its_device_and_its_threads(tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--quick", "--device", "cpu", "--only", "no-such-item", "--threads", "1",
                "--json", str(out)])
    meta = json.loads(out.read_text())["quick"]["meta"]
    assert meta["device"] == "cpu" and meta["threads"] == [1]
    assert "CPUs" in speed.table({"meta": meta, "items": {}})
    gpu = {**meta, "mode": "quick_cuda", "device": "cuda", "device_name": "NVIDIA H100"}
    assert "on NVIDIA H100" in speed.table({"meta": gpu, "items": {}})


def test_the_ppca_item_runs_without_scikit_learn(monkeypatch):
    # The GPU machine may lack scikit-learn: same-shaped stand-in data, named in the item.
    x, name = speed.wine()
    assert name == "wine" and x.shape == (178, 13)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # the import then fails
    stand_in, name = speed.wine()
    assert stand_in.shape == (178, 13) and "no scikit-learn" in name
    item = dict(speed.items(TOY))["log_marginal/ppca"](TOY, 1e10)
    assert item["data"] == name and item["ratio"] > 0
