"""``.. cli-help:: [COMMAND]``: the ``ppl-vae [COMMAND] --help`` text, made at build time.

The text comes from ``ppl_vae.cli.build_parser()``, so the page can never drift from the
command line, and needs no extension beyond Sphinx itself.
"""

import argparse
import os

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

WIDTH = "88"  # argparse wraps to $COLUMNS; fixed, so the page is the same on any terminal


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise ValueError(f"cli-help: ppl-vae has no command {name!r}")


def help_text(command: str | None = None) -> str:
    """The ``--help`` output of ``ppl-vae`` or of one of its commands."""
    from ppl_vae.cli import build_parser

    parser = build_parser()
    if command:
        parser = _subparser(parser, command)
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return parser.format_help()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


class CliHelp(SphinxDirective):
    optional_arguments = 1

    def run(self):
        from pathlib import Path

        import ppl_vae.cli

        for module in sorted(Path(ppl_vae.cli.__file__).parent.glob("*.py")):
            self.env.note_dependency(str(module))
        command = self.arguments[0] if self.arguments else None
        try:
            text = help_text(command)
        except ValueError as err:
            raise self.error(str(err)) from err
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app):
    app.add_directive("cli-help", CliHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
