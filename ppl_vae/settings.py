"""Pyro settings that the library's entry points scope to their own calls.

The library keeps every parameter in its module (``module_local_params``), so two models
built in one notebook never share parameters through Pyro's global param store. Setting
that for the whole process at import would change how a user's unrelated Pyro code
behaves, so each public entry point switches it on for its own call only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import pyro
import torch

F = TypeVar("F", bound=Callable)


def module_local(function: F) -> F:
    """Run ``function`` with ``pyro.settings`` ``module_local_params=True``.

    The previous value comes back when the call returns or raises, so Pyro code outside
    the library sees no change.

    Parameters
    ----------
    function : callable

    Returns
    -------
    callable
        ``function`` wrapped, with the same signature and docstring.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            for value in (*args, *kwargs.values()):
                _ready_for_local_params(value)
            return function(*args, **kwargs)

    return wrapper


def _ready_for_local_params(value) -> None:
    """Give every PyroModule in ``value`` the local param state it would have had.

    Pyro creates a module's local param state in its constructor only when the setting
    is on, so a module a user built outside the library's calls lacks it, and entering
    it with the setting on fails (AttributeError: 'param_state').
    """
    if not isinstance(value, torch.nn.Module):
        return
    for module in value.modules():
        context = getattr(module, "_pyro_context", None)
        if context is not None and not hasattr(context, "param_state"):
            context.param_state = {"params": {}, "constraints": {}}


@contextlib.contextmanager
def frozen(*modules):
    """Switch off the gradients of the modules' parameters for the length of a block
    (``None`` entries are skipped); each parameter's ``requires_grad`` comes back after."""
    flags = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
