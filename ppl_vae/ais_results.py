"""What AIS and BDMC return: per-datapoint estimates with their errors and diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class AISResult:
    """log p(x) per datapoint from annealed importance sampling.

    Attributes
    ----------
    log_marginal : Tensor of shape (N,)
        log of the mean AIS weight over chains: a stochastic lower bound on log p(x).
    log_marginal_se : Tensor of shape (N,)
        Its standard error over chains (delta method); NaN with one chain.
    log_weights : Tensor of shape (num_chains, N)
    ess : Tensor of shape (N,)
        Effective sample size of the chains' normalized weights, in [1, num_chains].
    acceptance : Tensor of shape (N,)
        Mean HMC acceptance probability over steps and chains.
    step_size : Tensor of shape (N,)
        Final step size per datapoint (constant when not adapted).
    num_steps, num_chains : int
    seconds : float
        Wall-clock time of the call.
    """

    log_marginal: Tensor
    log_marginal_se: Tensor
    log_weights: Tensor
    ess: Tensor
    acceptance: Tensor
    step_size: Tensor
    num_steps: int
    num_chains: int
    seconds: float

    def summary(self) -> dict:
        """Means over datapoints, with standard errors (spread plus Monte Carlo noise)."""
        n = len(self.log_marginal)
        spread = float(self.log_marginal.var()) / n if n > 1 else 0.0
        noise = float(self.log_marginal_se.nan_to_num().square().sum()) / n**2
        return {
            "num_data": n,
            "num_steps": self.num_steps,
            "num_chains": self.num_chains,
            "log_marginal": float(self.log_marginal.mean()),
            "log_marginal_se": math.sqrt(spread + noise),
            "ess": float(self.ess.mean()),
            "acceptance": float(self.acceptance.mean()),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class BDMCResult:
    """Bidirectional Monte Carlo bounds on log p(x) for data simulated from the model.

    Attributes
    ----------
    lower : Tensor of shape (N,)
        Forward AIS: a stochastic lower bound.
    upper : Tensor of shape (N,)
        Reverse AIS from the exact latents: a stochastic upper bound.
    forward, reverse : AISResult
        The two runs (``reverse.log_marginal`` is ``upper``).
    """

    lower: Tensor
    upper: Tensor
    forward: AISResult
    reverse: AISResult

    @property
    def gap(self) -> float:
        """Mean of ``upper - lower``: it bounds the error of AIS with these settings."""
        return float((self.upper - self.lower).mean())

    def summary(self) -> dict:
        """Mean bounds and the sandwich width, with the settings."""
        gap = self.upper - self.lower
        n = len(gap)
        return {
            "num_data": n,
            "num_steps": self.forward.num_steps,
            "num_chains": self.forward.num_chains,
            "lower": float(self.lower.mean()),
            "upper": float(self.upper.mean()),
            "gap": float(gap.mean()),
            "gap_se": float(gap.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "seconds": self.forward.seconds + self.reverse.seconds,
        }
