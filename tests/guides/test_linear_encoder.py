import pyro
import pytest
import torch

from ppl_vae.guides import ExactPosterior, LinearEncoder
from ppl_vae.models import PPCA


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_samples_broadcast_over_particles(covariance):
    guide = LinearEncoder(6, 3, covariance=covariance)
    x = torch.randn(5, 6)
    with pyro.plate("particles", 4, dim=-2):
        trace = pyro.poutine.trace(guide).get_trace(x)
    z = trace.nodes["z"]
    assert z["value"].shape == (4, 5, 3)
    assert z["fn"].log_prob(z["value"]).shape == (4, 5)


def test_full_covariance_factor_is_lower_triangular_with_positive_diagonal():
    guide = LinearEncoder(6, 3, covariance="full")
    with torch.no_grad():
        guide.raw_scale.normal_()
    tril = guide.scale_tril()
    assert torch.equal(tril, tril.tril())
    assert (tril.diagonal() > 0).all()


def test_unknown_covariance_is_refused():
    with pytest.raises(ValueError, match="covariance must be one of"):
        LinearEncoder(6, 3, covariance="banded")


def test_exact_posterior_needs_a_closed_form():
    with pytest.raises(ValueError, match="closed-form posterior"):
        ExactPosterior(LinearEncoder(6, 3))


def test_exact_posterior_holds_no_parameters_of_its_own():
    model = PPCA(6, 2)
    assert list(ExactPosterior(model).parameters()) == []
