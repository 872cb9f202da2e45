"""``python -m ppl_vae`` is the ``ppl-vae`` command (handy under torchrun)."""

from ppl_vae.cli import console

console()
