"""The figures: each returns labelled Axes, draws the right data, and refuses bad shapes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ppl_vae import FitResult, summarize_log_weights  # noqa: E402
from ppl_vae.plots import (  # noqa: E402
    plot_elbo_trace,
    plot_image_grid,
    plot_latents,
    plot_weight_diagnostics,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def fit_result(values) -> FitResult:
    history = np.asarray(values, dtype=float)
    return FitResult(history=history, step_seconds=np.zeros_like(history),
                     num_steps=len(history))


def assert_labelled(ax):
    assert ax.get_title()
    assert ax.get_xlabel()
    assert ax.get_ylabel()


def test_elbo_trace_draws_raw_trace_running_mean_and_reference():
    history = np.arange(10.0)
    ax = plot_elbo_trace(fit_result(history), smooth=3, reference=-1.5, label="run")
    assert_labelled(ax)
    raw, mean = ax.lines[0], ax.lines[1]
    np.testing.assert_array_equal(raw.get_ydata(), history)
    expected = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # trailing mean of 3
    np.testing.assert_allclose(mean.get_ydata(), expected)
    assert raw.get_alpha() < 1
    reference = ax.lines[2]
    assert reference.get_linestyle() == "--"
    np.testing.assert_array_equal(reference.get_ydata(), [-1.5, -1.5])


def test_elbo_trace_takes_a_list_of_results_with_labels():
    runs = [fit_result(np.linspace(-5, -1, 20)), fit_result(np.linspace(-6, -2, 30))]
    ax = plot_elbo_trace(runs, label=["a", "b"], smooth=5)
    assert len(ax.lines) == 4
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(text.startswith("a") for text in legend)
    assert any(text.startswith("b") for text in legend)


def test_elbo_trace_draws_on_a_given_axes_and_refuses_bad_arguments():
    _, ax = plt.subplots()
    assert plot_elbo_trace(fit_result([1.0, 2.0]), ax, smooth=None) is ax
    assert len(ax.lines) == 1
    with pytest.raises(ValueError, match="label"):
        plot_elbo_trace([fit_result([1.0]), fit_result([2.0])], label=["only one"])
    with pytest.raises(ValueError, match="smooth"):
        plot_elbo_trace(fit_result([1.0]), smooth=0)


def test_latents_colours_classes_and_accepts_tensors():
    z = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])
    ax = plot_latents(z, labels=np.array([0, 1, 0, 1]))
    assert_labelled(ax)
    assert ax.get_title() == "Latent space"
    assert len(ax.collections) == 2  # one scatter per class
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), [[0, 1], [4, 5]])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1"]


def test_latents_uses_first_two_dims_and_says_so():
    z = np.arange(12.0).reshape(4, 3)
    ax = plot_latents(z, title="Codes")
    assert "first 2 of 3" in ax.get_title()
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), z[:, :2])


def test_latents_with_many_classes_gets_a_colorbar():
    z = np.random.default_rng(0).normal(size=(30, 2))
    ax = plot_latents(z, labels=np.arange(30) % 15)
    assert len(ax.figure.axes) == 2


@pytest.mark.parametrize("z", [np.zeros(5), np.zeros((5, 1)), np.zeros((2, 2, 2))])
def test_latents_refuses_bad_shapes(z):
    with pytest.raises(ValueError, match="z must have shape"):
        plot_latents(z)


def test_latents_refuses_labels_of_the_wrong_length():
    with pytest.raises(ValueError, match="labels"):
        plot_latents(np.zeros((4, 2)), labels=[0, 1, 2])


def test_image_grid_tiles_images_exactly():
    images = np.arange(5 * 4).reshape(5, 4) / 19.0  # five 2x2 images
    ax = plot_image_grid(images, ncols=3, title="tiny")
    assert_labelled(ax)
    a, b, c, d, e = (img.reshape(2, 2) for img in images)
    blank = np.zeros((2, 2))
    expected = np.block([[a, b, c], [d, e, blank]])
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)


def test_image_grid_pads_each_image_with_black():
    images = np.ones((2, 4))  # two white 2x2 images
    ax = plot_image_grid(images, pad=1)
    tile = np.pad(np.ones((2, 2)), 1)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), np.hstack([tile, tile]))


def test_image_grid_takes_a_shape_for_non_square_images():
    images = torch.rand(3, 6)
    ax = plot_image_grid(images, shape=(2, 3))
    expected = np.hstack([img.reshape(2, 3) for img in images.numpy()])
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected)
    assert ax.get_title() == "3 images"


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (np.zeros((2, 6)), {}, "not a square"),
        (np.zeros((2, 6)), {"shape": (2, 2)}, "shape"),
        (np.zeros(4), {}, "images must have shape"),
        (np.zeros((0, 4)), {}, "images must have shape"),
        (np.full((2, 4), 2.0), {}, r"\[0, 1\]"),
        (np.zeros((2, 4)), {"ncols": 0}, "ncols"),
        (np.zeros((2, 4)), {"pad": -1}, "pad"),
    ],
)
def test_image_grid_refuses_bad_input(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plot_image_grid(images, **kwargs)


def test_weight_diagnostics_histograms_and_fraction_in_title():
    lw = torch.randn(200, 12, generator=torch.Generator().manual_seed(0)) * 3.0
    diag = summarize_log_weights(lw.double())
    axes = plot_weight_diagnostics(diag)
    assert len(axes) == 2
    for ax in axes:
        assert_labelled(ax)
    fraction = float((diag.khat > 0.7).double().mean())
    assert f"{fraction:.1%}" in axes[0].get_title()
    thresholds = sorted(line.get_xdata()[0] for line in axes[0].lines)
    assert thresholds == [0.5, 0.7]
    counts = sum(patch.get_height() for patch in axes[1].patches)
    assert counts == 12  # one ESS/K per datapoint


def test_weight_diagnostics_draws_on_given_axes_and_refuses_wrong_count():
    diag = summarize_log_weights(torch.randn(50, 4, dtype=torch.float64))
    _, axes = plt.subplots(1, 2)
    out = plot_weight_diagnostics(diag, axes)
    assert out[0] is axes[0] and out[1] is axes[1]
    _, three = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="two Axes"):
        plot_weight_diagnostics(diag, three)


def test_weight_diagnostics_draws_huge_khat_in_the_last_bin():
    # Log weights with a spread of 30 nats: a few weights dominate, k-hat far above 2.
    generator = torch.Generator().manual_seed(0)
    diag = summarize_log_weights(30.0 * torch.randn(100, 5, dtype=torch.float64,
                                                    generator=generator))
    assert (diag.khat > 2).all()
    axes = plot_weight_diagnostics(diag)
    counts = [patch.get_height() for patch in axes[0].patches]
    assert sum(counts) == 5 and counts[-1] == 5
    assert "5 above 2" in axes[0].get_xlabel()
    assert axes[0].get_xlim()[1] <= 2.5
    assert axes[1].get_xscale() == "log"
