"""`qdtk report`: figures and report.md of a run or solution folder."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_or_quant", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for report.md and the PNG figures (written over).")
def report(run_or_quant: str, out_dir: str) -> None:
    """Draw a run folder (`qdtk run --out`) or a solution folder (`qdtk quantize --out`).

    Writes orders.png (the planes of every group of every layer), bits.png (real bits per
    weight per layer), error.png (proxy error per layer, measured and predicted),
    sensitivity.png (the model-scope weights, with --budget-scope model), time.png (seconds per
    stage of a run) and report.md with the same numbers. Needs matplotlib: pip install
    'qdtk[report]'.
    """
    from qdtk.report import write_report

    click.echo(f"wrote {write_report(run_or_quant, out_dir)}")
