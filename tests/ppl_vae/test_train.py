import copy
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA


@pytest.fixture
def setup(ppca_truth):
    _, x = ppca_truth
    return PPCA(10, 2).double(), LinearEncoder(10, 2).double(), x[:300]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_history_has_one_elbo_per_step(setup):
    model, guide, x = setup
    result = ppl_vae.fit(model, guide, x, epochs=3, batch_size=64, lr=1e-2, progress=False)
    assert result.num_steps == 3 * math.ceil(300 / 64)
    assert result.history.shape == result.step_seconds.shape == (result.num_steps,)
    assert (result.step_seconds > 0).all()
    assert result.history[-5:].mean() > result.history[:5].mean()


def test_history_is_the_elbo_per_datapoint(setup):
    # Full batch from the exact posterior's family: the first step's ELBO estimate
    # agrees with the estimators' ELBO up to Monte Carlo error (one particle).
    model, guide, x = setup
    expected = ppl_vae.elbo(model, guide, x, num_samples=200, seed=0)
    result = ppl_vae.fit(model, guide, x, num_steps=1, lr=1e-12, seed=1, progress=False)
    se = float(expected.std()) / math.sqrt(len(x))
    assert abs(result.history[0] - float(expected.mean())) < 4 * se


def test_same_seed_same_history(setup):
    model, guide, x = setup
    state_m, state_g = snapshot(model), snapshot(guide)
    first = ppl_vae.fit(model, guide, x, num_steps=30, batch_size=50, seed=5, progress=False)
    model.load_state_dict(state_m)
    guide.load_state_dict(state_g)
    second = ppl_vae.fit(model, guide, x, num_steps=30, batch_size=50, seed=5, progress=False)
    np.testing.assert_array_equal(first.history, second.history)


def test_progress_false_prints_nothing(setup, capsys):
    model, guide, x = setup
    ppl_vae.fit(model, guide, x, num_steps=5, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_shows_elbo(setup, capsys):
    model, guide, x = setup
    ppl_vae.fit(model, guide, x, num_steps=5, progress=True)
    assert "elbo=" in capsys.readouterr().err


def test_nan_in_data_is_refused_before_training(setup):
    model, guide, x = setup
    x = x.clone()
    x[7, 3] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"x has 1 NaN or inf values \(first in row 7\)"):
        ppl_vae.fit(model, guide, x, num_steps=5, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_train_model_false_leaves_the_model_bit_identical(setup):
    model, guide, x = setup
    before_model, before_guide = snapshot(model), snapshot(guide)
    ppl_vae.fit(model, guide, x, num_steps=20, lr=1e-2, train_model=False, progress=False)
    assert all(torch.equal(v, before_model[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, before_guide[k]) for k, v in guide.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


class _BreaksAtStep(PPCA):
    """A PPCA whose likelihood turns NaN on its `bad_call`-th call."""

    def __init__(self, bad_call):
        super().__init__(10, 2)
        self.calls, self.bad_call, self.seen = 0, bad_call, None

    def noise_variance(self):
        self.calls += 1
        if self.calls == self.bad_call:
            self.seen = {k: v.detach().clone() for k, v in self.state_dict().items()}
            return super().noise_variance() * float("nan")
        return super().noise_variance()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_parameters(setup):
    _, guide, x = setup
    # Calls 1 to 3 are fit's one-row checks (observed sites, guide coverage, supports),
    # so call 7 is the 4th step (index 3).
    model = _BreaksAtStep(bad_call=7).double()
    # jit=False: a model that changes at its 4th call is not of static structure.
    with pytest.raises(FloatingPointError, match="at step 3"):
        ppl_vae.fit(model, guide, x, num_steps=10, lr=1e-2, progress=False, jit=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in model.seen.items())
    assert all(torch.isfinite(v).all() for v in after.values())


def test_lr_inf_restores_the_last_finite_parameters_and_optimizer_state(setup):
    # Before: FloatingPointError at step 1 with every parameter NaN (the step after a
    # finite loss had already written inf into them).
    model, guide, x = setup
    adam = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-2)
    ppl_vae.fit(model, guide, x, num_steps=7, optimizer=lambda _: adam, progress=False, seed=0)
    params = {**snapshot(model), **snapshot(guide)}
    state = copy.deepcopy(adam.state_dict()["state"])
    for group in adam.param_groups:
        group["lr"] = math.inf
    with pytest.raises(FloatingPointError, match="at step 0.*restored"):
        ppl_vae.fit(model, guide, x, num_steps=5, optimizer=lambda _: adam, progress=False)
    after = {**model.state_dict(), **guide.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in params.items())
    for key, saved in state.items():
        assert all(torch.equal(adam.state_dict()["state"][key][name], value)
                   for name, value in saved.items())


def test_a_late_blow_up_rolls_back_to_the_step_before_it(setup):
    # A rollback replays from an in-memory anchor (every ANCHOR_EVERY steps): the
    # parameters must be those an uninterrupted run has after the same steps.
    model, guide, x = setup
    start = {**snapshot(model), **snapshot(guide)}
    reference = ppl_vae.fit(model, guide, x, num_steps=130, batch_size=64, seed=3,
                            optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
                            progress=False)
    expected = {**snapshot(model), **snapshot(guide)}
    model.load_state_dict({k: start[k] for k in snapshot(model)})
    guide.load_state_dict({k: start[k] for k in snapshot(guide)})

    def blow_up(step, elbo):
        if step == 129:  # the next step (130) runs with an infinite learning rate
            for group in optimizer.param_groups:
                group["lr"] = math.inf

    def make(params):
        nonlocal optimizer
        optimizer = torch.optim.Adam(params, lr=1e-2)
        return optimizer

    optimizer = None
    with pytest.raises(FloatingPointError, match="at step 130"):
        ppl_vae.fit(model, guide, x, num_steps=140, batch_size=64, seed=3, optimizer=make,
                    progress=False, callback=blow_up)
    after = {**model.state_dict(), **guide.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in expected.items())
    assert reference.num_steps == 130


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "3", np.float64(2.0)])
def test_a_seed_that_is_not_an_integer_in_range_is_a_value_error(setup, seed):
    # Before: numpy's "Seed must be between 0 and 2**32 - 1", a casting TypeError, or
    # torch's "manual_seed expected a long, but got bool".
    model, guide, x = setup
    with pytest.raises(ValueError, match="seed"):
        ppl_vae.fit(model, guide, x, num_steps=1, seed=seed, progress=False)


def test_large_and_numpy_integer_seeds_are_accepted(setup):
    model, guide, x = setup
    for seed in (np.int64(7), 2**40, 2**63 - 1):
        ppl_vae.fit(model, guide, x, num_steps=1, seed=seed, progress=False)


def test_custom_optimizer_class_and_factory(setup):
    model, guide, x = setup
    ppl_vae.fit(model, guide, x, num_steps=3, optimizer=torch.optim.SGD, lr=1e-4, progress=False)
    factory = lambda params: torch.optim.RMSprop(params, lr=1e-4)  # noqa: E731
    ppl_vae.fit(model, guide, x, num_steps=3, optimizer=factory, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "give exactly one of epochs and num_steps"),
        ({"epochs": 1, "num_steps": 1}, "give exactly one of epochs and num_steps"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"num_steps": 2.5}, "num_steps must be a positive integer"),
        ({"num_steps": 1, "batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_steps": 1, "binarize": "static"}, "binarize must be one of"),
        ({"num_steps": 1, "clip_norm": 0}, "clip_norm must be a positive finite number"),
        ({"num_steps": 1, "clip_norm": float("nan")}, "clip_norm must be a positive"),
    ],
)
def test_bad_arguments_are_refused(setup, kwargs, match):
    model, guide, x = setup
    with pytest.raises(ValueError, match=match):
        ppl_vae.fit(model, guide, x, progress=False, **kwargs)


def test_dynamic_binarization_needs_intensities(setup):
    model, guide, x = setup
    with pytest.raises(ValueError, match=r"intensities in \[0, 1\]"):
        ppl_vae.fit(model, guide, x, num_steps=1, binarize="dynamic", progress=False)


def test_traced_loss_gives_the_same_history_as_the_plain_loss(setup):
    model, guide, x = setup
    state_m, state_g = snapshot(model), snapshot(guide)
    kwargs = dict(num_steps=40, batch_size=64, lr=1e-2, seed=2, progress=False)
    traced = ppl_vae.fit(model, guide, x, jit=True, **kwargs)
    traced_state = snapshot(model)
    model.load_state_dict(state_m)
    guide.load_state_dict(state_g)
    plain = ppl_vae.fit(model, guide, x, jit=False, **kwargs)
    # The trace keeps the minibatch scale N/B as a single-precision constant, so in
    # float64 the short last batch of each epoch differs in the 8th digit.
    np.testing.assert_allclose(traced.history, plain.history, rtol=1e-7)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(traced_state[k], v, rtol=1e-6, atol=1e-9)


def test_traced_vae_loss_matches_the_plain_one():
    from ppl_vae.guides import MLPEncoder
    from ppl_vae.models import VAE

    x = (torch.rand(120, 12, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    histories = []
    for jit in (True, False):
        torch.manual_seed(0)
        model, guide = VAE(12, 2, hidden=(8,)), MLPEncoder(12, 2, hidden=(8,))
        result = ppl_vae.fit(model, guide, x, num_steps=25, batch_size=50, seed=1,
                             progress=False, jit=jit)
        histories.append(result.history)
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-5)


class _ChangesEveryCall(PPCA):
    """A model whose structure changes between calls: the trace cannot hold it."""

    def __init__(self):
        super().__init__(10, 2)
        self.calls = 0

    def noise_variance(self):
        self.calls += 1
        return super().noise_variance() * (1.0 if self.calls % 2 else 2.0)


def test_a_model_the_trace_cannot_hold_falls_back_to_the_plain_loss(setup):
    _, guide, x = setup
    model = _ChangesEveryCall().double()
    with pytest.warns(UserWarning, match="differs from the plain one"):
        result = ppl_vae.fit(model, guide, x, num_steps=5, progress=False)
    assert np.isfinite(result.history).all()


class _ExtraLatent(PyroModule):
    """z and a second latent w per datapoint; a LinearEncoder covers only z."""

    data_dim = 10

    def forward(self, x=None, idx=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=idx, dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            w = pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))
            loc = z.sum(-1, keepdim=True) + w.unsqueeze(-1)
            pyro.sample("x", dist.Normal(loc.expand(x.shape), 1.0).to_event(1), obs=x)


def test_a_guide_missing_a_latent_site_is_refused_before_training(setup):
    _, guide, x = setup
    with pytest.raises(ValueError, match=r"latent sites \['w'\] have no site in the guide"):
        ppl_vae.fit(_ExtraLatent(), guide, x, num_steps=3, progress=False)


def _one_sgd_step(model, guide, x, clip_norm):
    """The change of every parameter in one full-batch SGD step with lr = 1."""
    before = {**snapshot(model), **snapshot(guide)}
    ppl_vae.fit(model, guide, x, num_steps=1, lr=1.0, optimizer=torch.optim.SGD, seed=3,
                clip_norm=clip_norm, progress=False)
    after = {**snapshot(model), **snapshot(guide)}
    return torch.cat([(after[k] - before[k]).flatten() for k in before])


def test_clip_norm_rescales_the_gradient_to_that_norm(setup):
    model, guide, x = setup
    start = (snapshot(model), snapshot(guide))

    def step(clip_norm):
        model.load_state_dict(start[0])
        guide.load_state_dict(start[1])
        return _one_sgd_step(model, guide, x, clip_norm)

    gradient = -step(None)  # SGD with lr = 1 moves by minus the gradient
    norm = float(gradient.norm())
    assert norm > 1.0  # so a clip at norm / 4 bites
    clipped = -step(norm / 4)
    torch.testing.assert_close(clipped, gradient / 4, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(-step(2 * norm), gradient, rtol=1e-9, atol=1e-12)
