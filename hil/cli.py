"""``pals hil run | profile | validate``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the hil commands to the ``pals`` CLI."""
