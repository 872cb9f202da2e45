"""Sphinx configuration of the ppl-vae API reference.

Built offline (CI has no network): no intersphinx. Types of torch, Pyro, numpy and the
standard library that appear in signatures cannot resolve, so ``nitpick_ignore_regex``
names those modules and nothing of ppl-vae; a broken reference to the library's own names
still fails the build under ``-n -W``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "ppl-vae"
author = "the ppl-vae authors"
copyright = "the ppl-vae authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",
    "cli_help",
    "api_coverage",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
html_theme = "furo"
html_title = "ppl-vae"

# numpydoc style. Types stay text (no cross-references made from "Tensor of shape (N, D)"):
# napoleon's field lists would turn every word of a shape into a reference to nothing.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_param = False
napoleon_use_rtype = False
napoleon_preprocess_types = False
# Attributes as a field list like Parameters: types stay text there too.
napoleon_custom_sections = [("Attributes", "params_style")]

autodoc_member_order = "bysource"
# Members a class inherits from ppl-vae's own base classes are documented on the class;
# those of torch.nn.Module and of builtins are skipped (api_coverage.skip_member), and so
# is a method whose only docstring would be torch's.
autodoc_default_options = {"members": True, "inherited-members": True}
autodoc_typehints_format = "short"

# Notebooks are shown with the outputs they were committed with; the test suite runs them.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

nitpicky = True
nitpick_ignore_regex = [
    # Third-party and standard-library types of the signatures: no inventory offline.
    (r"py:class", r"(torch|pyro|numpy|matplotlib)\..+"),
    (r"py:class", r"(collections\.abc\.(Callable|Mapping|Sequence)|os\.PathLike|pathlib\.Path)"),
]
