"""`qdtk capture`: masked calibration statistics (H per Linear input), block by block."""

from __future__ import annotations

import click

from qdtk.cli.options import capture_options, capture_options_from


@click.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--calib", default="builtin", show_default=True, metavar="SRC",
              help="Calibration text: a .txt file, a .jsonl file with a \"text\" field, a folder "
              "of them, 'builtin' (the built-in calibration mix) or builtin:NAME (the calibration "
              "part of one built-in source: pydoc, docstrings, manpages).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Statistics folder to write (a killed run resumes there).")
@capture_options()
def capture(model, calib, out, **kw) -> None:
    """Record H = (2/T) sum x x^T for every Linear input of MODEL on masked calibration text.

    MODEL is a checkpoint folder (or a .gguf file). The model runs block by block: only one
    block is on the device at a time. Writes one statistics file per block into OUT.
    """
    from qdtk.torch.capture import capture as run_capture

    opts = capture_options_from(kw)
    run_capture(model, calib, out, opts, echo=lambda s: click.echo(s, err=True))
    click.echo(f"statistics written to {out}")
