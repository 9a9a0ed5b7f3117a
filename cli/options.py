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
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the solver runs: 'cuda' needs a GPU that CuPy sees; 'auto' uses one if present.",
)
