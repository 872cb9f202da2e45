"""``python -m ppl_vae.cli`` is the ``ppl-vae`` command."""

from ppl_vae.cli.entry import console

console()
