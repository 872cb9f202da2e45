import math

import pyro
import pytest
import torch

import ppl_vae
from ppl_vae.data import load_dataset
from ppl_vae.guides import MLPEncoder
from ppl_vae.models import VAE
from ppl_vae.models.blocks import ACTIVATIONS, MLP
from ppl_vae.models.vae import SIGMA_FLOOR
from ppl_vae.simulate import sample_from_model

HIDDEN = (64, 64)


@pytest.fixture(scope="module")
def digits():
    return (
        load_dataset("digits", "train", binarize="static"),
        load_dataset("digits", "test", binarize="static"),
    )


@pytest.fixture(scope="module")
def trained(digits):
    """A Bernoulli VAE and its encoder, with their held-out ELBO before training."""
    x, x_test = digits
    pyro.set_rng_seed(0)
    model, guide = VAE(64, 4, hidden=HIDDEN), MLPEncoder(64, 4, hidden=HIDDEN)
    before = ppl_vae.elbo(model, guide, x_test, 50, seed=1)
    ppl_vae.fit(model, guide, x, epochs=30, batch_size=128, lr=3e-3, seed=0, progress=False)
    return model, guide, before


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


# ------------------------------------------------------------------------ MLP block


def test_mlp_broadcasts_over_leading_dims_and_splits_heads():
    net = MLP(6, 3, 2, hidden=(5,), activation="relu")
    x = torch.randn(7, 4, 6)
    first, second = net(x)
    assert first.shape == (7, 4, 3) and second.shape == (7, 4, 2)
    # Each leading index is computed on its own: the same as a loop over rows.
    torch.testing.assert_close(torch.cat(net(x[2, 1]), -1), torch.cat((first, second), -1)[2, 1])


def test_mlp_without_hidden_layers_is_one_linear_map():
    net = MLP(6, 3, hidden=())
    x = torch.randn(4, 6)
    (layer,) = net.layers
    torch.testing.assert_close(net(x), x @ layer.weight.T + layer.bias)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"activation": "swish"}, "activation"),
        ({"hidden": (8, 0)}, "hidden"),
        ({"hidden": 8}, "hidden"),
    ],
)
def test_mlp_refuses_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MLP(6, 3, **kwargs)


def test_mlp_knows_the_advertised_activations():
    for name in ("tanh", "relu", "softplus", "elu"):
        assert name in ACTIVATIONS
        assert MLP(3, 2, hidden=(4,), activation=name)(torch.randn(2, 3)).shape == (2, 2)


# ---------------------------------------------------------------------- the model


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"data_dim": 0}, "data_dim"),
        ({"latent_dim": -1}, "latent_dim"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"likelihood": "gaussian", "sigma": 0.0}, "sigma"),
        ({"likelihood": "gaussian", "sigma": -1.0}, "sigma"),
        ({"likelihood": "gaussian", "sigma": float("nan")}, "sigma"),
        ({"sigma": 0.5}, "sigma"),  # a scale means nothing to a Bernoulli
        ({"activation": "swish"}, "activation"),
        ({"hidden": (16, 0)}, "hidden"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, name):
    args = {"data_dim": 64, "latent_dim": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        VAE(args.pop("data_dim"), args.pop("latent_dim"), **args)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_sites_broadcast_over_a_particle_plate(likelihood):
    model = VAE(64, 3, hidden=(8,), likelihood=likelihood)
    guide = MLPEncoder(64, 3, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 64), 0.3))
    with pyro.plate("particles", 7, dim=-2):
        guide_trace = pyro.poutine.trace(guide).get_trace(x)
        replayed = pyro.poutine.replay(model, trace=guide_trace)
        model_trace = pyro.poutine.trace(replayed).get_trace(x)
    model_trace.compute_log_prob()
    assert model_trace.nodes["z"]["value"].shape == (7, 5, 3)
    assert model_trace.nodes["z"]["log_prob"].shape == (7, 5)
    assert model_trace.nodes["x"]["log_prob"].shape == (7, 5)
    # Each particle's likelihood is that of its own z.
    z = model_trace.nodes["z"]["value"]
    one = pyro.poutine.trace(pyro.poutine.condition(model, data={"z": z[4]})).get_trace(x)
    one.compute_log_prob()
    torch.testing.assert_close(one.nodes["x"]["log_prob"], model_trace.nodes["x"]["log_prob"][4])


def test_sampling_gives_binary_data_of_the_right_shape():
    model = VAE(64, 3, hidden=(8,))
    x, latents = sample_from_model(model, 20, seed=0)
    assert x.shape == (20, 64) and latents["z"].shape == (20, 3)
    assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_decode_is_the_mean_of_the_likelihood():
    z = torch.randn(2, 5, 3)
    bernoulli = VAE(64, 3, hidden=(8,))
    probs = bernoulli.decode(z)
    assert probs.shape == (2, 5, 64)
    torch.testing.assert_close(probs, torch.sigmoid(bernoulli.decoder(z)))
    gaussian = VAE(64, 3, hidden=(8,), likelihood="gaussian", sigma=0.3)
    torch.testing.assert_close(gaussian.decode(z), gaussian.decoder(z))
    torch.testing.assert_close(gaussian.noise_scale(), torch.full((64,), 0.3))


def test_bernoulli_refuses_nonbinary_data(digits):
    intensities = load_dataset("digits", "test")
    model, guide = VAE(64, 2, hidden=(8,)), MLPEncoder(64, 2, hidden=(8,))
    outside = int(((intensities != 0) & (intensities != 1)).sum())
    with pytest.raises(ValueError, match=f"{outside} values outside.*binarize"):
        ppl_vae.fit(model, guide, intensities, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="binarize"):
        ppl_vae.log_marginal(model, guide, intensities, 10)
    # Dynamic binarization takes intensities and hands the model binary minibatches.
    result = ppl_vae.fit(
        model, guide, intensities, num_steps=2, binarize="dynamic", seed=0, progress=False
    )
    assert result.num_steps == 2 and all(math.isfinite(v) for v in result.history)


def test_wrong_data_dim_is_refused(digits):
    model, guide = VAE(32, 2, hidden=(8,)), MLPEncoder(32, 2, hidden=(8,))
    with pytest.raises(ValueError, match="data_dim is 32"):
        ppl_vae.fit(model, guide, digits[1], num_steps=1, progress=False)
    with pytest.raises(ValueError, match="data_dim is 32"):
        ppl_vae.elbo(model, guide, digits[1], 10)


def test_two_vaes_share_no_parameters(digits):
    first, second = VAE(64, 2, hidden=(8,)), VAE(64, 2, hidden=(8,))
    before = {k: v.clone() for k, v in second.state_dict().items()}
    guide = MLPEncoder(64, 2, hidden=(8,))
    ppl_vae.fit(first, guide, digits[0], num_steps=5, lr=1e-2, seed=0, progress=False)
    for name, value in second.state_dict().items():
        assert torch.equal(value, before[name]), name
    name = "decoder.layers.0.weight"
    assert not torch.equal(first.state_dict()[name], before[name])  # the fit did move one


# -------------------------------------------------------------------- trained model


def test_training_improves_the_held_out_elbo(trained, digits):
    model, guide, before = trained
    after = ppl_vae.elbo(model, guide, digits[1], 50, seed=1)
    gain, se = mean_and_se(after - before)  # paired: per held-out datapoint
    assert gain > 20 * se
    assert gain > 5.0  # nats per datapoint: a model, not a rounding error


def test_log_marginal_bounds_the_elbo_on_the_same_weights(trained, digits):
    model, guide, _ = trained
    x = digits[1]
    lw = ppl_vae.log_weights(model, guide, x, 1000, seed=2)
    log_mean_exp = torch.logsumexp(lw, 0) - math.log(len(lw))
    # Jensen for the empirical distribution of the K weights: exact, column by column.
    assert bool((log_mean_exp >= lw.mean(0) - 1e-5 * lw.abs().max()).all())
    torch.testing.assert_close(ppl_vae.log_marginal(model, guide, x, 1000, seed=2), log_mean_exp)


def test_log_marginal_exceeds_the_elbo_beyond_monte_carlo_error(trained, digits):
    model, guide, _ = trained
    x = digits[1]
    gap = ppl_vae.log_marginal(model, guide, x, 1000, seed=3) - ppl_vae.elbo(
        model, guide, x, 100, seed=4
    )
    mean, se = mean_and_se(gap)
    assert mean > 5 * se
    # The encoder was trained, so the bound is not loose by tens of nats either.
    assert mean < 5.0


# ----------------------------------------------------------------------- Gaussian


@pytest.mark.parametrize("sigma", [0.25, None])
def test_gaussian_likelihood_trains(sigma):
    x, x_test = load_dataset("digits", "train"), load_dataset("digits", "test")
    pyro.set_rng_seed(0)
    model = VAE(64, 2, hidden=(32, 32), likelihood="gaussian", sigma=sigma)
    guide = MLPEncoder(64, 2, hidden=(32, 32))
    before = ppl_vae.elbo(model, guide, x_test, 20, seed=1)
    ppl_vae.fit(model, guide, x, epochs=20, batch_size=128, lr=1e-2, seed=0, progress=False)
    after = ppl_vae.elbo(model, guide, x_test, 20, seed=1)
    gain, se = mean_and_se(after - before)
    assert gain > 20 * se
    scale = model.noise_scale().detach()
    assert scale.shape == (64,)
    if sigma is None:
        # Learned: positive, above the floor, and well below its start of 1 (pixel
        # intensities spread by ~0.3 around the decoder's mean).
        assert float(scale.min()) >= SIGMA_FLOOR
        assert float(scale.max()) < 0.9
        assert model.raw_sigma.requires_grad
    else:
        assert torch.equal(scale, torch.full((64,), sigma))
        # Fixed: the decoder holds every parameter.
        assert all(name.startswith("decoder.") for name, _ in model.named_parameters())
