"""Variational families written as Pyro guides (``forward(x, idx=None, num_data=None)``).

Importing this package switches Pyro to module-local parameters (see ``models``).
"""

import pyro

from ppl_vae.guides.amortized import DeltaEncoder, LinearEncoder, MLPEncoder
from ppl_vae.guides.exact import ExactPosterior
from ppl_vae.guides.local import LocalMVN, LocalNormal

pyro.settings.set(module_local_params=True)

__all__ = [
    "LinearEncoder",
    "MLPEncoder",
    "DeltaEncoder",
    "ExactPosterior",
    "LocalNormal",
    "LocalMVN",
]
