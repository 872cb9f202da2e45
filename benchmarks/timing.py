"""Formatting shared by the benchmarks."""

from __future__ import annotations


def row(*cells) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"
