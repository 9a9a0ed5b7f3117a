"""Options shared by several commands (one definition each)."""

from __future__ import annotations

import click

include_option = click.option(
    "--include",
    multiple=True,
    metavar="PATTERN",
    help="Quantize only these weights (glob like '*.q_proj.weight', or 're:REGEX'); repeatable. "
    "Default: every 2-D weight inside the numbered transformer blocks, norms excluded.",
)
exclude_option = click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Leave these weights in full precision (glob or 're:REGEX'); repeatable.",
)
