"""The loss and its gradients recorded as one graph (``ppl_vae.joint_trace``): the same
loss and the same gradients as autograd on the plain loss, under the same draws, for
models written in every style the library takes; a fallback where it cannot record."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

import ppl_vae
from ppl_vae.guides import FlowEncoder, LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE
from ppl_vae.models.distributions import binary_check_may_be_frozen
from ppl_vae.objectives import IWAE
from ppl_vae.programs import as_programs
from ppl_vae.traced import CHECKED_CALLS, RECORD_GRADIENTS_FROM_STEPS, TracedLoss

G = torch.Generator().manual_seed(0)
X = torch.randn(60, 5, generator=G)
BINARY = (torch.rand(60, 12, generator=G) < 0.3).float()


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    # As in fit, which records its loss with Pyro's validation off (its checks read
    # values in Python).
    with pyro.validation_enabled(False):
        yield
    pyro.clear_param_store()


def two_site_model(x):
    """Two latent sites, one with event shape (2,) and one positive (a LogNormal), and a
    constrained ``pyro.param``."""
    w = pyro.param("w", lambda: torch.full((2, x.shape[-1]), 0.3))
    noise = pyro.param("noise", lambda: torch.tensor(0.8),
                       constraint=dist.constraints.positive)
    with pyro.plate("N", x.shape[0]):
        a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
        pyro.sample("obs", dist.Normal(a @ w, noise * s[..., None]).to_event(1), obs=x)


def two_site_guide(x):
    net = pyro.module("net", NET)
    out = net(x)
    with pyro.plate("N", x.shape[0]):
        pyro.sample("a", dist.Normal(out[..., :2], out[..., 2:].exp()).to_event(1))
        pyro.sample("s", dist.LogNormal(x.mean(-1), 0.3))


NET = nn.Linear(5, 4)  # a network a guide function registers with pyro.module


def value_reading_model(x):
    """Reads a value in Python (torch.fx cannot record that): static, but unrecordable."""
    scale = 1.0 if float(x.abs().max()) < 1e6 else 2.0
    with pyro.plate("N", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z[..., None], scale).to_event(1), obs=x)


def simple_guide(x):
    loc = pyro.param("loc_w", lambda: torch.full((x.shape[-1],), 0.1))
    with pyro.plate("N", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ loc, 0.5))


def _modules(case):
    torch.manual_seed(0)
    if case == "ppca":
        return PPCA(5, 2), LinearEncoder(5, 2), X
    if case == "vae":
        return VAE(12, 3, hidden=(8,)), MLPEncoder(12, 3, hidden=(8,)), BINARY
    if case == "flow":
        return (VAE(12, 3, hidden=(8,)), FlowEncoder(12, 3, hidden=(8,), num_flows=2),
                BINARY)
    model, guide = as_programs(two_site_model, two_site_guide, X, proposal=False)
    return model, guide, X


def _plain_loss_and_grads(module, params, x, idx, num_data, seed):
    torch.manual_seed(seed)
    loss = module(x, idx=idx, num_data=num_data)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def one_site_model(x):
    w = pyro.param("w1", lambda: torch.full((2, x.shape[-1]), 0.3))
    with pyro.plate("N", x.shape[0]):
        a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(a @ w, 1.0).to_event(1), obs=x)


def _case(case):
    """(loss module, data) of a model, guide and objective."""
    if case == "iwae":
        model, guide, x = _modules("ppca")
        return IWAE(5)(model, guide), x
    if case == "particles":
        model, guide, x = _modules("ppca")
        return Trace_ELBO(num_particles=4, vectorize_particles=True,
                          max_plate_nesting=1)(model, guide), x
    if case == "autonormal":
        model, guide = as_programs(one_site_model, AutoNormal(one_site_model), X)
        module = Trace_ELBO(max_plate_nesting=1)(model, guide)
        module(X, idx=torch.arange(len(X)), num_data=len(X))  # the autoguide's parameters
        return module, X
    model, guide, x = _modules(case)
    return Trace_ELBO(max_plate_nesting=1)(model, guide), x


@pytest.mark.parametrize("case", ["ppca", "vae", "flow", "functions", "iwae", "particles",
                                  "autonormal"])
def test_recorded_loss_and_gradients_are_autograds(case):
    module, x = _case(case)
    params = [p for p in module.parameters() if p.requires_grad]
    traced = TracedLoss(module)
    idx = torch.arange(20, 52)
    # The recording and checked calls, then calls that run the recorded graph alone.
    with binary_check_may_be_frozen():
        for call in range(CHECKED_CALLS + 3):
            expected, expected_grads = _plain_loss_and_grads(module, params, x[idx], idx,
                                                             len(x), seed=call)
            for p in params:
                p.grad = None
            torch.manual_seed(call)
            loss = traced(x[idx], idx, len(x))
            loss.backward()
            assert traced.records_gradients()
            assert float(loss) == pytest.approx(float(expected), rel=1e-5)
            for p, g in zip(params, expected_grads, strict=True):
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_a_parameter_the_loss_does_not_use_keeps_no_gradient():
    model, guide, x = _modules("ppca")
    guide.spare = nn.Parameter(torch.ones(3))  # Adam leaves a parameter with no grad alone
    traced = TracedLoss(Trace_ELBO(max_plate_nesting=1)(model, guide))
    idx = torch.arange(len(x))
    traced(x, idx, len(x)).backward()
    assert traced.records_gradients()
    assert guide.spare.grad is None
    assert model.W.grad is not None


def test_the_gradients_follow_the_upstream_gradient():
    model, guide, x = _modules("ppca")
    traced = TracedLoss(Trace_ELBO(max_plate_nesting=1)(model, guide))
    idx = torch.arange(len(x))
    torch.manual_seed(5)
    traced(x, idx, len(x)).backward()
    once = model.W.grad.clone()
    model.W.grad = None
    torch.manual_seed(5)
    (3.0 * traced(x, idx, len(x))).backward()
    torch.testing.assert_close(model.W.grad, 3.0 * once)


def test_a_model_that_reads_values_falls_back_to_the_forward_trace():
    model, guide = as_programs(value_reading_model, simple_guide, X, proposal=False)
    module = Trace_ELBO(max_plate_nesting=1)(model, guide)
    traced = TracedLoss(module)
    idx = torch.arange(len(X))
    torch.manual_seed(2)
    loss = traced(X, idx, len(X))
    assert traced.is_traced() and not traced.records_gradients()
    torch.manual_seed(2)
    assert float(loss) == pytest.approx(float(module(X, idx=idx, num_data=len(X))), rel=1e-6)


@pytest.mark.parametrize("case", ["ppca", "functions"])
def test_fit_with_the_recorded_gradients_follows_the_plain_fit(case):
    runs, start = [], {k: v.clone() for k, v in NET.state_dict().items()}
    for jit in (True, False):
        pyro.clear_param_store()
        NET.load_state_dict(start)  # fit trains the guide's network in place
        model, guide, x = _modules(case)
        if case == "functions":
            model, guide = two_site_model, two_site_guide
        runs.append(ppl_vae.fit(model, guide, x, num_steps=60, batch_size=16, lr=1e-2,
                                seed=4, progress=False, jit=jit).history)
    torch.testing.assert_close(torch.as_tensor(runs[0]), torch.as_tensor(runs[1]),
                               rtol=1e-4, atol=1e-4)


def test_a_resumed_fit_with_recorded_gradients_ends_where_an_uninterrupted_one_does(tmp_path):
    steps = RECORD_GRADIENTS_FROM_STEPS + 20  # long enough to record the gradients

    def run(**options):
        model, guide, x = _modules("ppca")
        ppl_vae.fit(model, guide, x, num_steps=steps, batch_size=16, lr=1e-2, seed=4,
                    progress=False, **options)
        return {**model.state_dict(), **guide.state_dict()}

    def interrupt(step, elbo):
        if step == 57:
            raise KeyboardInterrupt

    expected = run()
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=path, callback=interrupt)
    resumed = run(checkpoint=path, resume=True)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_warm_up_schedule_and_clipping_follow_the_plain_fit_on_the_recorded_path():
    # The KL weight is a buffer changed in place every step: the recording must read it
    # as an input, not freeze its first value.
    runs = []
    for jit in (True, False):
        model, guide, x = _modules("vae")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            runs.append(ppl_vae.fit(model, guide, x, num_steps=RECORD_GRADIENTS_FROM_STEPS + 10,
                                    batch_size=20, lr=1e-2, seed=6, kl_warmup=80,
                                    lr_schedule="cosine", clip_norm=5.0, progress=False,
                                    jit=jit).history)
        # No fallback: the checked calls would hide a frozen weight behind the plain loss.
        assert not [w for w in seen if "traced loss" in str(w.message)]
    torch.testing.assert_close(torch.as_tensor(runs[0]), torch.as_tensor(runs[1]),
                               rtol=1e-4, atol=1e-4)
