"""Small building blocks that models and guides share (and a user's model may use too)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyro
from torch import Tensor, nn


def data_plate(x: Tensor | None, idx: Tensor | None = None, num_data: int | None = None):
    """The one ``"data"`` plate (dim -1) that every per-datapoint site lives in.

    ``x`` is the minibatch [B, D] whose rows are ``idx`` of a dataset of ``num_data``
    rows; with ``idx=None`` the minibatch is the whole dataset. ``x=None`` (sampling from
    a model) needs ``num_data``.
    """
    size = num_data if num_data is not None else len(x)
    return pyro.plate("data", size, subsample=idx, dim=-1)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


class MLP(nn.Module):
    """A fully connected network ``in_dim -> hidden... -> sum(out_dims)``, split into heads.

    A plain ``nn.Module`` on purpose: inside a ``PyroModule`` it keeps its parameters
    module-local, and its attribute lookups stay as cheap as in plain PyTorch.

    Parameters
    ----------
    in_dim : int
        Size of the input's last dim.
    *out_dims : int
        Size of each output head. One head gives a Tensor; several give a tuple of
        Tensors cut from one final linear layer (e.g. an encoder's loc and scale).
    hidden : sequence of int
        Widths of the hidden layers; empty for a single linear map.
    activation : str
        Name of the nonlinearity after each hidden layer, one of ``ACTIVATIONS``.

    Inputs have shape ``(..., in_dim)``: any leading dims (particles, batch) pass through.
    """

    def __init__(
        self,
        in_dim: int,
        *out_dims: int,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
    ):
        super().__init__()
        positive_dim(in_dim, "in_dim")
        if not out_dims:
            raise ValueError("MLP needs at least one output size after in_dim")
        out_dims = tuple(positive_dim(size, "out_dims") for size in out_dims)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ValueError(f"hidden must be a sequence of layer widths, got {hidden!r}")
        hidden = tuple(positive_dim(width, "hidden") for width in hidden)
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.in_dim, self.out_dims = in_dim, out_dims
        self.hidden, self.activation = hidden, activation
        layers: list[nn.Module] = []
        widths = (in_dim,) + hidden
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(hidden[-1] if hidden else in_dim, sum(out_dims)))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.layers(x)
        if len(self.out_dims) == 1:
            return out
        return out.split(self.out_dims, dim=-1)


def positive_dim(value, name: str) -> int:
    """``value`` if it is an int >= 1, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def network(owner: nn.Module, name: str) -> nn.Module:
    """The plain ``nn.Module`` held by ``owner`` under ``name``, looked up directly.

    ``PyroModule.__getattr__`` announces every weight of a plain sub-network to Pyro's
    effect handlers on each access (one ``param`` message per tensor: about a third of
    Pyro's per-step overhead for a VAE). With module-local parameters (the library's
    own calls) no handler needs them, so hot paths skip the hook. Without them (a plain
    ``pyro.infer.SVI`` loop) the hook is what registers the weights in Pyro's param
    store, where the SVI optimizer finds them, so the lookup goes through it.
    """
    if pyro.settings.get("module_local_params"):
        return owner._modules[name]
    return getattr(owner, name)
