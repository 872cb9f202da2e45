"""Public docstrings are at most 30 lines: the full story belongs in the README and docs/.

Every line counts, the Examples section included (the docstring as ``inspect`` cleans
it). The public names are those of the docs' coverage check: ``__all__`` of ppl_vae,
ppl_vae.models and ppl_vae.guides, and the public methods and properties of their
classes.
"""

import importlib.util
import inspect
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "docs" / "_ext" / "api_coverage.py"
MAX_LINES = 30

def _public_docstrings():
    spec = importlib.util.spec_from_file_location("api_coverage", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.public_objects())


def lines(doc: str) -> int:
    return len(inspect.cleandoc(doc).splitlines()) if doc.strip() else 0


def test_lines_counts_every_line_of_the_cleaned_docstring():
    assert lines("One.\n\n    Two.\n\n    >>> 1\n    1\n    ") == 6
    assert lines("") == 0


def test_no_public_docstring_is_over_30_lines():
    too_long = {name: lines(doc) for name, doc in _public_docstrings().items()
                if lines(doc) > MAX_LINES}
    assert too_long == {}
