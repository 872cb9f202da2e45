"""Synthetic datasets drawn from a generative model, with the latents that made them."""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from torch import Tensor

from ppl_vae.guides.latent_space import is_latent_site
from ppl_vae.programs import as_model, follows_convention
from ppl_vae.seeding import random_state, set_random_state
from ppl_vae.settings import module_local
from ppl_vae.validation import as_data, positive_int


@module_local
def sample_from_model(
    model, num_data: int, *, seed: int = 0, like=None, plate: str | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Draw a synthetic dataset from a generative model.

    A model written as ``model(x)`` (not the library's convention) is run on rows
    shaped like ``like`` with its observations drawn (see :doc:`data`).

    Parameters
    ----------
    model : Pyro program
    num_data, seed : int
        Number of datapoints N; the seed (the caller's random state is restored).
    like : Tensor or ndarray of shape (M, D), optional
        Data a ``model(x)`` takes, for the width D of the draws.
    plate : str, optional
        The model's data plate, when it cannot be told from the model.

    Returns
    -------
    x : Tensor of shape (N, D)
    latents : dict of str to Tensor
        Each latent site's value, e.g. ``latents["z"]`` of shape (N, k).

    Examples
    --------
    >>> from ppl_vae.models import PPCA
    >>> x, latents = sample_from_model(PPCA(5, 2), 100, seed=0)
    >>> tuple(x.shape), tuple(latents["z"].shape)
    ((100, 5), (100, 2))
    """
    positive_int(num_data, "num_data")
    convention = follows_convention(model)
    if not convention:
        if like is None:
            raise ValueError("a model written as model(x) needs like= (data it takes) to "
                             "know the width of the draws")
        like = as_data(like, name="like")
        model = as_model(model, like, plate=plate)
    state = random_state()
    try:
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            if convention:
                trace = poutine.trace(model).get_trace(None, None, num_data)
            else:
                template = like.new_zeros(num_data, like.shape[1])
                trace = poutine.trace(poutine.uncondition(model)).get_trace(template)
    finally:
        set_random_state(state)
    name = "x" if convention else _observed_site(trace)
    if name not in trace.nodes:
        raise ValueError("model has no sample site named 'x' (the observed data)")
    x = trace.nodes[name]["value"].detach()
    if x.dim() != 2 or len(x) != num_data:
        raise ValueError(
            f"the model's site {name!r} must have shape (num_data={num_data}, D); got "
            f"{tuple(x.shape)}"
        )
    latents = {
        site_name: site["value"].detach()
        for site_name, site in trace.nodes.items()
        if is_latent_site(site) and site_name != name and not site["infer"].get("is_auxiliary")
    }
    return x, latents


def _observed_site(trace) -> str:
    # Under uncondition the observed sites are sampled; they keep their obs flag in infer.
    observed = [name for name, site in trace.nodes.items()
                if site["type"] == "sample" and site["infer"].get("was_observed")]
    if len(observed) != 1:
        raise ValueError(f"the model must have one observed site to draw data from, found "
                         f"{observed}")
    return observed[0]
