"""fit checks the parameters for NaN and inf at its snapshots and wherever they are read,
not after every step: a step that breaks them is still found exactly, by a replay, and
the state before it restored (see ppl_vae.train.ANCHOR_EVERY)."""

import math

import pytest
import torch

import ppl_vae
from ppl_vae.checkpoint import load
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA


class InfiniteLrAt(torch.optim.Adam):
    """Adam whose step number ``bad`` (counted in its own state, so that a replay repeats
    it) has an infinite learning rate for the parameters ``hit`` selects."""

    def __init__(self, params, bad: int, hit=lambda p: True):
        super().__init__(params, lr=1e-2)
        self.bad, self.hit = bad, hit

    def step(self, closure=None):
        first = self.state[self.param_groups[0]["params"][0]]
        done = int(first["step"]) if "step" in first else 0
        if done != self.bad:
            return super().step(closure)
        saved = {p: p.detach().clone() for group in self.param_groups
                 for p in group["params"] if not self.hit(p)}
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = math.inf
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, lrs, strict=True):
                group["lr"] = lr
            with torch.no_grad():
                for p, value in saved.items():
                    p.copy_(value)


class ShelvedParameter(PPCA):
    """PPCA with a parameter whose breaking the loss never sees: the noise variance takes
    its finite part only. Its NaN shows in no loss, so only the parameter check finds it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.shelf = torch.nn.Parameter(torch.zeros(3, dtype=self.W.dtype))

    def noise_variance(self):
        finite = torch.where(self.shelf.isfinite(), self.shelf, torch.zeros_like(self.shelf))
        return super().noise_variance() + 1e-3 * (finite + 1).square().sum()


def fresh(x, model_class=PPCA):
    torch.manual_seed(0)
    return model_class(10, 2).double(), LinearEncoder(10, 2).double()


def states(*modules):
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules)
            for k, v in m.state_dict().items()}


def fit(model, guide, x, steps, bad, hit=lambda p: True, **kwargs):
    return ppl_vae.fit(model, guide, x, num_steps=steps, batch_size=64, seed=3,
                       optimizer=lambda params: InfiniteLrAt(params, bad, hit),
                       progress=False, **kwargs)


@pytest.fixture
def x(ppca_truth):
    return ppca_truth[1][:300]


def assert_state(expected, *modules):
    """The modules hold ``expected`` (from :func:`states`) bit for bit."""
    after = states(*modules)
    assert all(torch.equal(after[k], v) for k, v in expected.items())


def reference(x, steps, model_class=PPCA):
    model, guide = fresh(x, model_class)
    fit(model, guide, x, steps, bad=10**9)
    return states(model, guide)


def test_a_blow_up_between_snapshots_is_found_from_the_next_loss(x):
    # Step 130 makes every parameter infinite; the loss of step 131 is NaN. Without a
    # callback nothing checked the parameters after step 130 itself.
    expected = reference(x, 130)
    model, guide = fresh(x)
    with pytest.raises(FloatingPointError, match="parameters became NaN or inf at step 130"):
        fit(model, guide, x, 140, bad=130)
    assert_state(expected, model, guide)


def test_a_blow_up_at_the_last_step_is_found_at_the_end(x):
    expected = reference(x, 129)
    model, guide = fresh(x)
    with pytest.raises(FloatingPointError, match="at step 129"):
        fit(model, guide, x, 130, bad=129)
    assert_state(expected, model, guide)


def test_a_blow_up_no_loss_shows_is_found_before_a_checkpoint_is_written(x, tmp_path):
    # Step 105 breaks only the shelved parameter: every later loss stays finite. The
    # checkpoint due at step 120 must not be written with it.
    path = tmp_path / "run.pt"
    expected = reference(x, 105, ShelvedParameter)
    model, guide = fresh(x, ShelvedParameter)
    shelf = model.shelf
    with pytest.raises(FloatingPointError, match="at step 105"):
        fit(model, guide, x, 150, bad=105, hit=lambda p: p is shelf,
            checkpoint=path, checkpoint_every=20)
    assert_state(expected, model, guide)
    saved = load(path)
    assert saved["step"] == 100
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_a_blow_up_no_loss_shows_is_found_at_the_next_snapshot(x):
    # No checkpoint and more steps after it: the snapshot of step 200 checks first.
    expected = reference(x, 150, ShelvedParameter)
    model, guide = fresh(x, ShelvedParameter)
    shelf = model.shelf
    with pytest.raises(FloatingPointError, match="at step 150"):
        fit(model, guide, x, 250, bad=150, hit=lambda p: p is shelf)
    assert_state(expected, model, guide)
