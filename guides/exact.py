"""The exact posterior of a linear-Gaussian model, as a guide."""

from __future__ import annotations

import pyro
from pyro.nn import PyroModule
from torch import Tensor

from ppl_vae.models.blocks import data_plate


class ExactPosterior(PyroModule):
    """q(z | x) = p(z | x), read from ``model.posterior(x)``.

    With it every importance weight p(x, z) / q(z | x) equals p(x), so one sample gives
    log p(x) exactly: the reference against which the estimators are tested.

    Parameters
    ----------
    model : a model with a closed-form ``posterior(x)`` (PPCA, FactorAnalysis).
    """

    def __init__(self, model):
        super().__init__()
        if not callable(getattr(model, "posterior", None)):
            raise ValueError(
                f"model must have a closed-form posterior(x); {type(model).__name__} has none"
            )
        # Held in a tuple so that the model's parameters are not also the guide's.
        self._model = (model,)
        self.latent_dim = model.latent_dim

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        posterior = self._model[0].posterior(x)
        with data_plate(x, idx, num_data):
            return pyro.sample("z", posterior)
