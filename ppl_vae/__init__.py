"""ppl-vae: latent variable models in Pyro, and how good their inference is.

Models and guides may be any Pyro program taking the data (``ppl_vae.programs`` turns
them into the engine's form at every entry point). The library's own modules keep their
parameters to themselves: the entry points switch Pyro to module-local parameters for
their own call only (``ppl_vae.settings.module_local``), so importing it changes nothing
for other Pyro code.
"""

from ppl_vae.ais import AISResult, BDMCResult, ais, bdmc
from ppl_vae.checkpoint import CheckpointError
from ppl_vae.data import load_dataset
from ppl_vae.estimators import (
    Diagnostics,
    diagnostics,
    elbo,
    log_marginal,
    log_weights,
    pareto_khat,
    summarize_log_weights,
)
from ppl_vae.gaps import GapReport, gaps
from ppl_vae.local_fit import fit_local
from ppl_vae.refine import RefinementCurve, refine
from ppl_vae.simulate import sample_from_model
from ppl_vae.surgery import SurgeryReport, elbo_surgery
from ppl_vae.train import FitResult, Interrupted, fit

__all__ = [
    "AISResult",
    "BDMCResult",
    "CheckpointError",
    "Diagnostics",
    "FitResult",
    "GapReport",
    "Interrupted",
    "RefinementCurve",
    "SurgeryReport",
    "ais",
    "bdmc",
    "diagnostics",
    "elbo",
    "elbo_surgery",
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
