"""ppl-vae: latent variable models in Pyro, and how good their inference is.

Importing the package switches Pyro to module-local parameters: every model and guide
keeps its parameters in its own ``nn.Module`` (nothing in the global param store).
"""

import pyro

from ppl_vae.estimators import (
    Diagnostics,
    diagnostics,
    elbo,
    log_marginal,
    log_weights,
    pareto_khat,
    summarize_log_weights,
)
from ppl_vae.train import FitResult, fit

pyro.settings.set(module_local_params=True)

__all__ = [
    "Diagnostics",
    "FitResult",
    "diagnostics",
    "elbo",
    "fit",
    "log_marginal",
    "log_weights",
    "pareto_khat",
    "summarize_log_weights",
]
