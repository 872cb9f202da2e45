"""Smoke test of the installed wheel, fed on stdin from a folder that tries to shadow it.

`.ci/run` runs it as `python - < wheel_smoke.py` from an empty temporary folder holding
its own `models.py` and `guides/` (as most research repositories do), so the current
folder comes first on sys.path: the imports below must still reach the installed
package, and the package must work without the repository.
"""

import math
import sys

import torch

import ppl_vae
from ppl_vae.guides import LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE

torch.set_num_threads(1)
for module in (ppl_vae, sys.modules["ppl_vae.models"], sys.modules["ppl_vae.guides"]):
    assert "site-packages" in module.__file__, f"{module.__name__} from {module.__file__}"
assert "models" not in sys.modules and "guides" not in sys.modules, "a user's file was imported"

torch.manual_seed(0)
x = torch.randn(200, 2) @ torch.randn(2, 6) + 0.1 * torch.randn(200, 6)
model, guide = PPCA(6, 2), LinearEncoder(6, 2)
ppl_vae.fit(model, guide, x, num_steps=300, batch_size=50, lr=3e-2, seed=0, progress=False)
estimate = ppl_vae.log_marginal(model, guide, x, num_samples=200, seed=0).mean().item()
exact = model.marginal().log_prob(x).mean().item()
assert math.isfinite(estimate) and abs(estimate - exact) < 0.05, (estimate, exact)

digits = ppl_vae.load_dataset("digits", split="test", binarize="static")[:100]
vae, encoder = VAE(64, 2, hidden=(16,)), MLPEncoder(64, 2, hidden=(16,))
ppl_vae.fit(vae, encoder, digits, epochs=2, batch_size=50, seed=0, progress=False)
assert torch.isfinite(ppl_vae.log_marginal(vae, encoder, digits, num_samples=10)).all()
print(f"wheel smoke test passed: PPCA log p(x) {estimate:.4f} (exact {exact:.4f}), "
      f"package at {ppl_vae.__file__}")
