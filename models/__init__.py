"""Generative models written as Pyro models (``forward(x, idx=None, num_data=None)``).

Importing this package switches Pyro to module-local parameters, so that every model
keeps its parameters in its own ``nn.Module`` and two models built in one notebook can
never share or leak parameters through Pyro's global param store.
"""

import pyro

from ppl_vae.models.factor_analysis import FactorAnalysis
from ppl_vae.models.ppca import PPCA
from ppl_vae.models.vae import VAE

pyro.settings.set(module_local_params=True)

__all__ = ["PPCA", "FactorAnalysis", "VAE"]
