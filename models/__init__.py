"""Generative models written as Pyro models (``forward(x, idx=None, num_data=None)``).

Every model keeps its parameters in its own ``nn.Module``. Importing this package changes
no Pyro setting: the library's entry points run with module-local parameters, and a plain
``pyro.infer.SVI`` loop registers the parameters in Pyro's param store as usual.
"""

from ppl_vae.models.factor_analysis import FactorAnalysis
from ppl_vae.models.ppca import PPCA
from ppl_vae.models.vae import VAE

__all__ = ["PPCA", "FactorAnalysis", "VAE"]
