"""Everything follows the model's device: run where CUDA exists, skipped elsewhere."""

import pytest
import torch

import ppl_vae
from ppl_vae.guides import ExactPosterior, LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def test_exact_posterior_weights_are_exact_on_the_gpu(ppca_truth):
    model, x = ppca_truth
    model, x = model.to(CUDA), x.to(CUDA)
    lw = ppl_vae.log_weights(model, ExactPosterior(model), x[:50], 20, seed=0)
    assert lw.device.type == "cuda"
    exact = model.marginal().log_prob(x[:50]).detach()
    torch.testing.assert_close(lw, exact.expand(20, -1), rtol=0, atol=1e-8)
    result = ppl_vae.ais(model, x[:50], proposal=ExactPosterior(model), num_steps=5,
                         num_chains=3, seed=0, progress=False)
    assert result.log_weights.device.type == "cuda"
    torch.testing.assert_close(result.log_weights, exact.expand(3, -1), rtol=0, atol=1e-8)


def test_fit_estimates_and_gaps_run_on_the_gpu():
    torch.manual_seed(0)
    model, guide = VAE(20, 3, hidden=(32,)).to(CUDA), MLPEncoder(20, 3, hidden=(32,)).to(CUDA)
    x = (torch.rand(200, 20) < 0.3).float().to(CUDA)
    ppl_vae.fit(model, guide, x, num_steps=50, batch_size=50, seed=0, progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert ppl_vae.log_marginal(model, guide, x, 50, seed=0).device.type == "cuda"
    local = ppl_vae.fit_local(model, x[:40], "flow", init_from=guide, steps=50,
                              progress=False)
    assert all(p.device.type == "cuda" for p in local.parameters())
    report = ppl_vae.gaps(model, guide, x[:40], num_samples=20, local_steps=50,
                          log_px="ais", ais_steps=5, ais_chains=2, progress=False)
    assert report.per_datapoint["log_px"].device.type == "cuda"


def test_ppca_trains_on_the_gpu(ppca_truth):
    model, x = ppca_truth
    x = x.to(CUDA)
    fitted, guide = PPCA(10, 2).double().to(CUDA), LinearEncoder(10, 2).double().to(CUDA)
    ppl_vae.fit(fitted, guide, x, num_steps=100, lr=3e-2, seed=0, progress=False)
    assert torch.isfinite(fitted.marginal().log_prob(x)).all()
