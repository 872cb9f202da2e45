"""Variational families written as Pyro guides (``forward(x, idx=None, num_data=None)``).

Importing this package changes no Pyro setting (see ``ppl_vae.models``).
"""

from ppl_vae.guides.amortized import DeltaEncoder, FlowEncoder, LinearEncoder, MLPEncoder
from ppl_vae.guides.exact import ExactPosterior
from ppl_vae.guides.latent_space import LatentSpace
from ppl_vae.guides.local import LocalDiag, LocalFlow, LocalFull, LocalMVN, LocalNormal

__all__ = [
    "LinearEncoder",
    "MLPEncoder",
    "DeltaEncoder",
    "FlowEncoder",
    "ExactPosterior",
    "LocalDiag",
    "LocalFull",
    "LocalFlow",
    "LocalNormal",
    "LocalMVN",
    "LatentSpace",
]
