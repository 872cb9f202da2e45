"""The installed package is ppl_vae alone: a user's own models.py or guides/ shadows nothing."""

import subprocess
import sys

CODE = """
import sys
import ppl_vae
from ppl_vae.guides import MLPEncoder
from ppl_vae.models import VAE
assert "models" not in sys.modules and "guides" not in sys.modules
x = ppl_vae.load_dataset("digits", split="test", binarize="static")[:20]
model, guide = VAE(64, 2, hidden=(8,)), MLPEncoder(64, 2, hidden=(8,))
ppl_vae.fit(model, guide, x, num_steps=2, progress=False, seed=0)
import models
"""


def test_a_models_py_in_the_working_directory_does_not_shadow_the_library(tmp_path):
    (tmp_path / "models.py").write_text("USER_MODELS = True\n")
    (tmp_path / "guides").mkdir()
    (tmp_path / "guides" / "__init__.py").write_text("raise ImportError('user guides')\n")
    # -c puts the working directory first on sys.path, as an interactive session does.
    done = subprocess.run([sys.executable, "-c", CODE + "assert models.USER_MODELS\n"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
