"""fit's default optimizer: Adam with its fused kernel where torch has one, else Adam."""

import pytest
import torch

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA
from ppl_vae.objectives import make_optimizer


def trained(x, optimizer=None, dtype=torch.float32):
    torch.manual_seed(0)
    model, guide = PPCA(10, 2).to(dtype), LinearEncoder(10, 2).to(dtype)
    ppl_vae.fit(model, guide, x.to(dtype), num_steps=60, batch_size=50, lr=1e-2, seed=1,
                optimizer=optimizer, progress=False)
    return torch.cat([p.detach().flatten() for p in (*model.parameters(),
                                                     *guide.parameters())])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_default_takes_the_steps_of_torchs_adam(ppca_truth, dtype):
    # Equal up to rounding (measured: 1.2e-7 in float32, 1.1e-16 in float64), while a
    # learning rate 10% off moves the parameters by 0.04 after 60 steps.
    x = ppca_truth[1][:300]
    ours, adam = trained(x, dtype=dtype), trained(x, torch.optim.Adam, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, adam, rtol=0, atol=tolerance)
    other_lr = trained(x, lambda p: torch.optim.Adam(p, lr=1.1e-2), dtype)
    assert (ours - other_lr).abs().max() > 1000 * tolerance


def test_the_default_is_fused_where_torch_can_and_plain_adam_where_it_cannot(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(3))]
    fused = make_optimizer(None, params, 0.1)
    assert isinstance(fused, torch.optim.Adam)
    assert fused.param_groups[0]["fused"] is True  # torch >= 2.4 has a CPU kernel

    real = torch.optim.Adam

    def without_fused(params, lr, fused=None):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point "
                               "Tensors of supported devices")
        return real(params, lr=lr)

    monkeypatch.setattr(torch.optim, "Adam", without_fused)
    plain = make_optimizer(None, iter(params), 0.1)  # a one-shot iterator survives the retry
    assert not plain.param_groups[0]["fused"]
    assert plain.param_groups[0]["params"] == params
