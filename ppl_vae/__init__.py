"""ppl-vae: latent variable models in Pyro, and how good their inference is.

Importing the package switches Pyro to module-local parameters: every model and guide
keeps its parameters in its own ``nn.Module`` (nothing in the global param store).
"""

import pyro

from ppl_vae.data import load_dataset, sample_from_model
from ppl_vae.estimators import (
    Diagnostics,
    diagnostics,
    elbo,
    log_marginal,
    log_weights,
    pareto_khat,
    summarize_log_weights,
)
from ppl_vae.gaps import GapReport, RefinementCurve, fit_local, gaps, refine
from ppl_vae.train import FitResult, fit

pyro.settings.set(module_local_params=True)

__all__ = [
    "Diagnostics",
    "FitResult",
    "GapReport",
    "RefinementCurve",
    "diagnostics",
    "elbo",
    "fit",
    "fit_local",
    "gaps",
    "load_dataset",
    "log_marginal",
    "log_weights",
    "pareto_khat",
    "refine",
    "sample_from_model",
    "summarize_log_weights",
]
