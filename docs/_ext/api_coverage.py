"""Fails the build (a warning, an error under ``-W``) when the public API is not covered.

Public: every name in ``ppl_vae.__all__``, ``ppl_vae.models.__all__`` and
``ppl_vae.guides.__all__``, and the public methods and properties of those classes that
ppl-vae defines (on the class or a base class of its own; ``forward``, the Pyro program
the class docstring describes, aside). Each must have a docstring, its own or that of the
ppl-vae method it overrides, and be described somewhere in the reference.
"""

import dataclasses
import importlib
import inspect
import sys

PACKAGES = ("ppl_vae", "ppl_vae.models", "ppl_vae.guides")
NOT_METHODS = {"forward"}  # a model's or guide's Pyro program: the class docstring says it


def ours(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith("ppl_vae")


def function_of(member):
    """The function behind a method, classmethod, property or cached_property."""
    for attribute in ("fget", "func", "__func__"):
        member = getattr(member, attribute, member)
    return member


def doc_of_member(cls, name: str) -> str:
    """The docstring of ``cls.name`` from ``cls`` or its ppl-vae bases, never torch's."""
    for base in cls.__mro__:
        if not ours(base):
            break
        member = base.__dict__.get(name)
        if member is not None and (function_of(member).__doc__ or "").strip():
            return function_of(member).__doc__.strip()
    return ""


def defining_class(function):
    """The class a method was defined in, from its ``__qualname__`` (None for a function)."""
    *path, _ = getattr(function, "__qualname__", "").split(".")
    owner = sys.modules.get(getattr(function, "__module__", None) or "")
    for part in path:
        owner = getattr(owner, part, None)
    return owner if path and inspect.isclass(owner) else None


def class_doc(cls) -> str:
    """The docstring written for ``cls``, not one inherited or made by ``dataclass``."""
    doc = (cls.__dict__.get("__doc__") or "").strip()
    if dataclasses.is_dataclass(cls):
        made = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
        doc = "" if doc == made else doc
    return doc


def _members(cls) -> list[str]:
    """Public methods and properties of ``cls`` and of its ppl-vae base classes."""
    found = {}
    for base in reversed([c for c in cls.__mro__ if ours(c)]):
        found.update(vars(base))
    return [
        name for name, value in found.items()
        if not name.startswith("_") and name not in NOT_METHODS
        and (inspect.isfunction(function_of(value)) or isinstance(value, property))
    ]


def public_objects():
    """(full name, docstring) of every public function, class, method and property."""
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.isclass(obj):
                yield f"{package}.{name}", (obj.__doc__ or "").strip()
                continue
            yield f"{package}.{name}", class_doc(obj)
            if obj.__name__ == name:  # an alias is documented as such; its class has the rest
                for member in _members(obj):
                    yield f"{package}.{name}.{member}", doc_of_member(obj, member)


def problems(documented, objects=None) -> list[str]:
    """What is wrong with the public API, given the names the reference describes."""
    found = []
    for full_name, doc in public_objects() if objects is None else objects:
        if not doc:
            found.append(f"public API without a docstring: {full_name}")
        if documented is not None and full_name not in documented:
            found.append(f"public API missing from the reference: {full_name}")
    return found


def check(app, env) -> None:
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for problem in problems(env.get_domain("py").objects):
        logger.warning(problem)


def skip_member(app, what, name, obj, skip, options):
    """Document a class's members only where ppl-vae wrote them and their docstring."""
    if what not in ("class", "exception"):
        return None
    owner = defining_class(function_of(obj))
    if not ours(function_of(obj)) or owner is None:
        return True  # torch.nn.Module's, builtins', or a plain value
    return True if not doc_of_member(owner, name) else None


def setup(app):
    app.connect("env-check-consistency", check)
    app.connect("autodoc-skip-member", skip_member)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
