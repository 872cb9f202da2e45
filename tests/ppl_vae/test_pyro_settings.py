"""The library scopes Pyro's module-local parameters to its own calls (issue 9, section 2)."""

import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import ppl_vae
from ppl_vae.guides import LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE, FactorAnalysis
from ppl_vae.settings import module_local


@pytest.fixture(autouse=True)
def empty_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_importing_the_library_changes_no_pyro_setting():
    code = (
        "import pyro; before = pyro.settings.get()\n"
        "import ppl_vae, ppl_vae.models, ppl_vae.guides, ppl_vae.cli\n"
        "assert pyro.settings.get() == before, (before, pyro.settings.get())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_plain_pyro_param_model_trains_as_usual():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    svi = SVI(model, lambda x: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(300):
        svi.step(torch.full((10,), 3.0))
    assert abs(pyro.param("loc").item() - 3.0) < 0.05


def plain_svi(model, guide, x, steps=150):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    return [svi.step(x) for _ in range(steps)]


@pytest.mark.parametrize("build", [
    lambda: (VAE(16, 2, hidden=(32,)), MLPEncoder(16, 2, hidden=(32,))),
    lambda: (PPCA(16, 2), LinearEncoder(16, 2)),
    lambda: (FactorAnalysis(16, 2), LinearEncoder(16, 2, covariance="full")),
], ids=["vae-mlp", "ppca-linear", "fa-linear-full"])
def test_a_plain_svi_loop_trains_the_library_s_models(build):
    # Before: the VAE's parameters did not move at all, PPCA and FA raised
    # "'Parameter' object has no attribute 'unconstrained'".
    pyro.set_rng_seed(0)
    model, guide = build()
    x = torch.bernoulli(torch.full((100, 16), 0.3)) if isinstance(model, VAE) else \
        torch.randn(100, 16) @ torch.randn(16, 16)
    before = {k: v.clone() for k, v in {**model.state_dict(), **guide.state_dict()}.items()}
    losses = plain_svi(model, guide, x)
    after = {**model.state_dict(), **guide.state_dict()}
    unmoved = [k for k in before if torch.equal(before[k], after[k]) and "prior" not in k]
    assert unmoved == []
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("setting", [False, True])
def test_fit_leaves_the_param_store_empty_and_the_setting_as_it_was(setting):
    x = torch.randn(50, 6)
    with pyro.settings.context(module_local_params=setting):
        ppl_vae.fit(PPCA(6, 2), LinearEncoder(6, 2), x, num_steps=5, progress=False)
        assert pyro.settings.get("module_local_params") is setting
    assert len(pyro.get_param_store()) == 0


def test_two_models_fitted_in_one_process_share_no_parameters():
    x = torch.randn(50, 6)
    first, second = PPCA(6, 2), PPCA(6, 2)
    ppl_vae.fit(first, LinearEncoder(6, 2), x, num_steps=20, progress=False, seed=0)
    kept = {k: v.clone() for k, v in first.state_dict().items()}
    ppl_vae.fit(second, LinearEncoder(6, 2), 3 * x + 1, num_steps=20, progress=False, seed=1)
    assert all(torch.equal(kept[k], v) for k, v in first.state_dict().items())
    assert not torch.equal(first.W, second.W)


def test_module_local_restores_the_setting_when_the_call_raises():
    @module_local
    def boom():
        assert pyro.settings.get("module_local_params") is True
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        boom()
    assert pyro.settings.get("module_local_params") is False
