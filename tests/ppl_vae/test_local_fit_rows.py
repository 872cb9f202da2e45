"""fit_local's rows converge on their own: a row's q*_n does not depend on its neighbours."""

import importlib

import pytest
import torch

import ppl_vae
from ppl_vae.models import VAE
from ppl_vae.row_convergence import RowAdam, row_noise

gaps_module = importlib.import_module("ppl_vae.local_fit")


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    model = VAE(6, 2, hidden=(8,)).double()
    x = (torch.rand(100, 6, dtype=torch.float64) < 0.4).double()
    return model, x


@pytest.mark.parametrize("family", ["diag", "flow"])
def test_rows_fitted_alone_equal_rows_fitted_among_others(tiny_vae, family):
    # The old rule read the ELBO averaged over every row fitted: fitted alone, 20 rows
    # decayed and stopped at other steps than among 100, and came out different.
    model, x = tiny_vae
    kwargs = dict(steps=600, window=20, seed=3, progress=False)
    alone, fit_alone = gaps_module.fit_local_trusted(model, x[:20], family, init_from=None, lr=3e-2,
                                              num_particles=4, **kwargs)
    among, fit_among = gaps_module.fit_local_trusted(model, x, family, init_from=None, lr=3e-2,
                                              num_particles=4, **kwargs)
    for (name, a), (_, b) in zip(alone.named_parameters(), among.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(a, b[:20], rtol=1e-9, atol=1e-9, msg=name)
    e_alone = ppl_vae.elbo(model, alone, x[:20], 200, seed=1)
    e_among = ppl_vae.elbo(model, among, x, 200, seed=1)[:20]
    assert (e_alone - e_among).abs().max() < 1e-5
    # Rows stop on their own: the fit of 100 rows ran at least as long as that of 20.
    assert fit_among.num_steps >= fit_alone.num_steps


def test_row_noise_of_a_row_depends_on_its_index_and_step_only():
    few = row_noise(5, 20, (3, 2), step=7)
    many = row_noise(5, 100, (3, 2), step=7)
    assert few.shape == (3, 20, 2) and many.shape == (3, 100, 2)
    assert torch.equal(few, many[:, :20])
    assert not torch.equal(few, row_noise(5, 20, (3, 2), step=8))


def test_row_adam_is_adam_with_a_rate_per_row_and_frozen_rows_stay_put():
    torch.manual_seed(0)
    target = torch.randn(4, 3)
    mine = torch.zeros(4, 3, requires_grad=True)
    theirs = torch.zeros(4, 3, requires_grad=True)
    ours = RowAdam([mine], lr=0.1, num_rows=4)
    ours.row_lr[1] = 0.1 / 3
    ours.active[3] = False
    adam = torch.optim.Adam([theirs], lr=0.1)
    slow = torch.zeros(1, 3, requires_grad=True)
    adam_slow = torch.optim.Adam([slow], lr=0.1 / 3)
    for _ in range(30):
        for p, opt, t in ((mine, ours, target), (theirs, adam, target),
                          (slow, adam_slow, target[1:2])):
            opt.zero_grad()
            ((p - t) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(mine[[0, 2]], theirs[[0, 2]], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine[1:2], slow, rtol=1e-6, atol=1e-7)
    assert torch.equal(mine[3], torch.zeros(3))
    assert torch.equal(ours.state[mine]["exp_avg"][3], torch.zeros(3))


def test_a_failed_local_step_keeps_its_floating_point_error(tiny_vae, monkeypatch):
    # The NaN diagnosis draws 16 particles; a local guide fed 8 particles of fixed noise
    # cannot be run so, and that must not replace the fit's own error.
    from ppl_vae import train

    model, x = tiny_vae

    def failing(*args, **kwargs):
        raise FloatingPointError("the loss became -inf at step 0")

    monkeypatch.setattr(train, "_step", failing)
    with pytest.raises(FloatingPointError, match="-inf"):
        ppl_vae.fit_local(model, x, "flow", steps=5, progress=False, seed=0)


@pytest.mark.parametrize("steps, traced", [(gaps_module.TRACE_FROM_STEPS - 1, False),
                                           (gaps_module.TRACE_FROM_STEPS, True)])
def test_a_local_fit_traces_its_loss_only_when_long_enough_to_pay(tiny_vae, monkeypatch,
                                                                  steps, traced):
    model, x = tiny_vae
    asked = {}

    class Stop(Exception):
        pass

    def fit_trusted(*args, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(gaps_module, "fit_trusted", fit_trusted)
    with pytest.raises(Stop):
        ppl_vae.fit_local(model, x, "diag", steps=steps, progress=False, seed=0)
    assert asked["jit"] is traced and asked["total"] == steps
