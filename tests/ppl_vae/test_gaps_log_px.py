"""gaps(log_px=...): exact, importance sampling and AIS agree where the truth is known."""

import math

import pytest
import torch

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import VAE


@pytest.fixture(scope="module")
def rotated_with_encoder(rotated):
    model, x = rotated
    guide = LinearEncoder(10, 2).double()
    ppl_vae.fit(model, guide, x, num_steps=300, lr=3e-2, seed=0, progress=False,
                train_model=False)
    return model, guide, x[:40]


def test_ais_log_px_agrees_with_the_exact_one_and_is_recorded(rotated_with_encoder):
    model, guide, x = rotated_with_encoder
    exact = ppl_vae.gaps(model, guide, x, num_samples=200, local_steps=300, seed=0,
                         progress=False, log_px="exact")
    annealed = ppl_vae.gaps(model, guide, x, num_samples=200, local_steps=300, seed=0,
                            progress=False, log_px="ais", ais_steps=100, ais_chains=8)
    assert annealed.log_px_method == "ais"
    assert annealed.log_px_settings == {"num_steps": 100, "num_chains": 8}
    assert "num_steps=100" in str(annealed)
    error = annealed.per_datapoint["log_px"] - exact.per_datapoint["log_px"]
    se = float(error.std()) / math.sqrt(len(error))
    assert abs(float(error.mean())) < 3 * se + 1e-3
    # The same local fit and draws: the amortization gap is unchanged.
    assert annealed.amortization_gap == pytest.approx(exact.amortization_gap)
    assert annealed.approximation_gap_se >= exact.approximation_gap_se
    again = ppl_vae.GapReport.from_json(annealed.to_json())
    assert again.log_px_settings == annealed.log_px_settings


def test_bad_log_px_options_are_refused_before_any_fitting():
    model = VAE(6, 2, hidden=(8,))
    guide = ppl_vae.guides.MLPEncoder(6, 2, hidden=(8,))
    x = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="log_px"):
        ppl_vae.gaps(model, guide, x, log_px="quadrature", progress=False)
    with pytest.raises(ValueError, match="closed-form"):
        ppl_vae.gaps(model, guide, x, log_px="exact", progress=False)
    with pytest.raises(ValueError, match="ais_steps"):
        ppl_vae.gaps(model, guide, x, log_px="ais", ais_steps=0, progress=False)
