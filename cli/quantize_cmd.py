"""`qdtk quantize`: DAQ of every selected Linear, one solution file per block, resumable."""

from __future__ import annotations

import click

from qdtk.cli.options import exclude_option, include_option


def daq_options(bits, iters, tau, lam, percdamp, compensate, backend) -> dict:
    """The options that define a DAQ run (all of them enter the resume fingerprint)."""
    from qdtk.daq import resolve_backend

    return {
        "method": "daq",
        "bits": bits,
        "iters": iters,
        "tau": tau,
        "lam": lam,
        "percdamp": percdamp,
        "compensate": compensate,
        "refit": True,
        "backend": resolve_backend(backend),
    }


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--stats", "stats_dir", required=True, type=click.Path(file_okay=False),
              help="Statistics folder written by `qdtk capture` (H per Linear input).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder for the solution files and report.json; rerunning resumes.")
@click.option("--bits", type=click.IntRange(1, 4), default=2, show_default=True,
              help="Binary planes per 128-column group (uniform order).")
@click.option("--iters", type=click.IntRange(0), default=15, show_default=True,
              help="Alternating refinement iterations of the DAQ block solver.")
@click.option("--tau", type=float, default=2.0, show_default=True,
              help="Salience z-score above which a weight's error is up-weighted.")
@click.option("--lam", type=float, default=3.0, show_default=True,
              help="Error weight of the salient weights (1 elsewhere).")
@click.option("--percdamp", type=click.FloatRange(min=0, min_open=True), default=0.01,
              show_default=True, help="Damping of H as a fraction of its mean diagonal.")
@click.option("--no-compensation", is_flag=True,
              help="Solve every block alone, without GPTQ-style error feedback.")
@click.option("--backend", type=click.Choice(["auto", "cpu", "reference"]), default="auto",
              show_default=True,
              help="DAQ kernels: auto (the fastest available), cpu (Numba), reference (NumPy).")
@include_option
@exclude_option
def quantize(model_dir, stats_dir, out_dir, bits, iters, tau, lam, percdamp, no_compensation,
             backend, include, exclude) -> None:
    """Quantize the Linear weights of MODEL_DIR with DAQ, using the statistics in --stats.

    Writes one solution file per transformer block and report.json (orders, proxy output
    error tr(D H D^T)/tr(W H W^T), honest bits per weight with the float16 scales, time).
    """
    from qdtk.quantize import quantize_model

    options = daq_options(bits, iters, tau, lam, percdamp, not no_compensation, backend)
    report = quantize_model(model_dir, stats_dir, out_dir, options, include=include,
                            exclude=exclude)
    click.echo(f"{'layer':<60} {'proxy error':>12} {'bits/weight':>12}")
    for name, r in report["layers"].items():
        click.echo(f"{name:<60} {r['proxy_error']:>12.4g} {r['bits_per_weight']:>12.4f}")
    s = report["summary"]
    click.echo(f"{s['layers']} layers, {s['weights']:,} weights: {s['bits_per_weight']:.4f} "
               f"bits/weight, mean proxy error {s['mean_proxy_error']:.4g}; wrote {out_dir}")
