"""Variational families written as Pyro guides (``forward(x, idx=None, num_data=None)``).

Importing this package switches Pyro to module-local parameters (see ``models``).
"""

import pyro

from guides.amortized import DeltaEncoder, LinearEncoder, MLPEncoder
from guides.exact import ExactPosterior
from guides.local import LocalMVN, LocalNormal

pyro.settings.set(module_local_params=True)

__all__ = [
    "LinearEncoder",
    "MLPEncoder",
    "DeltaEncoder",
    "ExactPosterior",
    "LocalNormal",
    "LocalMVN",
]
