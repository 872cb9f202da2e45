"""The public API has docstrings, and the docs' coverage check reports what it should.

The full check (each name also described in the reference) runs in the Sphinx build,
``docs/_ext/api_coverage.py``, which CI runs with warnings as errors.
"""

import importlib.util
from pathlib import Path

import torch

import ppl_vae
from ppl_vae.guides import LocalDiag, LocalNormal

SOURCE = Path(__file__).resolve().parents[2] / "docs" / "_ext" / "api_coverage.py"


def _coverage():
    spec = importlib.util.spec_from_file_location("api_coverage", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_function_class_and_method_has_a_docstring():
    assert _coverage().problems(documented=None) == []


def test_the_public_names_include_all_of_dunder_all_and_the_classes_methods():
    names = {name for name, _ in _coverage().public_objects()}
    assert {f"ppl_vae.{name}" for name in ppl_vae.__all__} <= names
    # Inherited from ppl-vae's own base class (LinearGaussian), not torch's Module.
    assert {"ppl_vae.models.PPCA.marginal", "ppl_vae.models.PPCA.from_data"} <= names
    assert "ppl_vae.models.PPCA.to" not in names
    assert "ppl_vae.models.PPCA.forward" not in names
    # An alias is one name; its members are the class's.
    assert LocalNormal is LocalDiag and "ppl_vae.guides.LocalNormal" in names
    assert not any(name.startswith("ppl_vae.guides.LocalNormal.") for name in names)


def test_a_missing_docstring_and_a_name_left_out_of_the_reference_are_reported():
    coverage = _coverage()
    objects = [("ppl_vae.fit", "Fit."), ("ppl_vae.nothing", "")]
    assert coverage.problems({"ppl_vae.fit", "ppl_vae.nothing"}, objects) == [
        "public API without a docstring: ppl_vae.nothing"
    ]
    assert coverage.problems({"ppl_vae.nothing"}, objects) == [
        "public API missing from the reference: ppl_vae.fit",
        "public API without a docstring: ppl_vae.nothing",
    ]


class _Base(torch.nn.Module):
    __module__ = "ppl_vae.example"

    def sample(self):
        """Documented once, on the base class."""


class _Child(_Base):
    __module__ = "ppl_vae.example"

    def sample(self):
        pass


def test_a_method_that_overrides_a_documented_one_takes_its_docstring():
    coverage = _coverage()
    assert coverage.doc_of_member(_Child, "sample") == "Documented once, on the base class."
    assert torch.nn.Module.to.__doc__
    assert coverage.doc_of_member(_Child, "to") == ""  # torch's docstring does not count
